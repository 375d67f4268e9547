use std::io::Write;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use proptest::prelude::*;

use super::*;
use crate::rewrite::prepare;

const FROM: &str = "https://api.bc.test/v2.0/t1/Production/";
const TO: &str = "https://proxy.test/bc/";

fn links() -> LinkMap {
    LinkMap::new(FROM, TO)
}

fn rewrite_chunks<'a>(links: &LinkMap, chunks: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut rewriter = XmlRewriter::new(links);
    let mut out = BytesMut::new();
    for chunk in chunks {
        rewriter.push(links, chunk, &mut out);
        assert!(rewriter.buffered() <= links.max_len());
    }
    rewriter.finish(&mut out);
    String::from_utf8(out.to_vec()).unwrap()
}

/// Rewrites `input` whole, byte by byte and split in two at every byte: all the same.
fn rewrite_with(links: &LinkMap, input: &str) -> String {
    let bytes = input.as_bytes();
    let whole = rewrite_chunks(links, [bytes]);
    assert_eq!(
        rewrite_chunks(links, bytes.chunks(1)),
        whole,
        "byte by byte"
    );
    for at in 0..=bytes.len() {
        let (a, b) = bytes.split_at(at);
        assert_eq!(rewrite_chunks(links, [a, b]), whole, "split at {at}");
    }
    whole
}

fn rewrite(input: &str) -> String {
    rewrite_with(&links(), input)
}

#[test]
fn wsdl_addresses_imports_and_includes_are_rewritten() {
    let wsdl = r#"<?xml version="1.0" encoding="utf-8"?>
<wsdl:definitions xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/" xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/" xmlns:soap12="http://schemas.xmlsoap.org/wsdl/soap12/" targetNamespace="urn:microsoft-dynamics-schemas/codeunit/Sales">
  <wsdl:import namespace="urn:x" location="https://api.bc.test/v2.0/t1/Production/WS/CRONUS%20USA/Codeunit/Sales?wsdl=wsdl1"/>
  <wsdl:types><xsd:schema xmlns:xsd="http://www.w3.org/2001/XMLSchema">
    <xsd:import namespace="urn:y" schemaLocation='https://api.bc.test/v2.0/t1/Production/WS/Sales?xsd=xsd0'/>
    <xsd:include schemaLocation = "https://API.BC.TEST:443/v2.0/t1/Production/WS/Sales?xsd=xsd1&amp;v=2"/>
  </xsd:schema></wsdl:types>
  <wsdl:service name="Sales"><wsdl:port name="Sales_Port" binding="tns:Sales_Binding">
    <soap:address location="https://api.bc.test/v2.0/t1/Production/WS/CRONUS%20USA/Codeunit/Sales"/>
    <soap12:address location="https://api.bc.test/v2.0/t1/Production/WS/CRONUS%20USA/Codeunit/Sales"></soap12:address>
  </wsdl:port></wsdl:service>
</wsdl:definitions>"#;
    let expected = wsdl
        .replace(FROM, TO)
        .replace("https://API.BC.TEST:443/v2.0/t1/Production/", TO);
    assert_ne!(expected, wsdl);
    assert_eq!(rewrite(wsdl), expected);
}

#[test]
fn atom_base_href_and_id_are_rewritten() {
    let feed = r#"<feed xml:base="https://api.bc.test/v2.0/t1/Production/ODataV4/" xmlns="http://www.w3.org/2005/Atom">
<id>https://api.bc.test/v2.0/t1/Production/ODataV4/Customers</id>
<link rel="next" href="https://api.bc.test/v2.0/t1/Production/ODataV4/Customers?$skiptoken='10000'&amp;$top=5" />
<entry><id>
   https://api.bc.test/v2.0/t1/Production/ODataV4/Customers('10000')
</id><title type="text">https://api.bc.test/v2.0/t1/Production/ is our API</title></entry>
</feed>"#;
    assert_eq!(rewrite(feed), feed.replace(FROM, TO));
}

#[test]
fn other_hosts_paths_and_values_that_only_contain_the_url_are_left_alone() {
    for input in [
        r#"<a href="https://api.bc.test/v2.0/t1/Sandbox/x"/>"#,
        r#"<a href="https://evil.test/v2.0/t1/Production/x"/>"#,
        r#"<a href="https://api.bc.test.evil/v2.0/t1/Production/x"/>"#,
        r#"<a href="https://api.bc.test/v2.0/t1/production/x"/>"#,
        r#"<a href="http://api.bc.test/v2.0/t1/Production/x"/>"#,
        r#"<a href="https://api.bc.test:4443/v2.0/t1/Production/x"/>"#,
        r#"<a href="https://api.bc.test/v2.0/t1/Production"/>"#,
        r#"<a href="see https://api.bc.test/v2.0/t1/Production/x"/>"#,
        r#"<a>see https://api.bc.test/v2.0/t1/Production/x</a>"#,
        r#"<a>https://api.bc.test/v2.0/t1/Prod<b/>uction/x</a>"#,
        r#"<a>https&#58;//api.bc.test/v2.0/t1/Production/x</a>"#,
        r#"<a b="https://api.bc.test/v2.0/t1/Prod'uction/x" c='https://api.bc.test/v2.0/t1/Prod"uction/'/>"#,
        "<a>https://api.bc.test/v2.0/t1/Production",
    ] {
        assert_eq!(rewrite(input), input);
    }
}

#[test]
fn comments_pis_and_the_doctype_are_not_data() {
    let input = r#"<?xml version="1.0"?>
<!DOCTYPE feed [
  <!ENTITY up "https://api.bc.test/v2.0/t1/Production/>'">
  <!-- it's "https://api.bc.test/v2.0/t1/Production/" ]> -->
  <?pi https://api.bc.test/v2.0/t1/Production/ ]> ?>
]>
<?xml-stylesheet href="https://api.bc.test/v2.0/t1/Production/style.xsl"?>
<!-- <a href="https://api.bc.test/v2.0/t1/Production/x"/> -- > still a comment -->
<a href="https://api.bc.test/v2.0/t1/Production/after-doctype"/>"#;
    let expected = input.replace(
        "https://api.bc.test/v2.0/t1/Production/after-doctype",
        "https://proxy.test/bc/after-doctype",
    );
    assert_eq!(rewrite(input), expected);
}

#[test]
fn cdata_content_is_character_data() {
    assert_eq!(
        rewrite(
            "<id><![CDATA[https://api.bc.test/v2.0/t1/Production/x?a=1&b=<2>]]]></id><x><![CDATA[<a href=\"https://api.bc.test/v2.0/t1/Production/x\"/>]]>https://api.bc.test/v2.0/t1/Production/y</x>"
        ),
        "<id><![CDATA[https://proxy.test/bc/x?a=1&b=<2>]]]></id><x><![CDATA[<a href=\"https://api.bc.test/v2.0/t1/Production/x\"/>]]>https://proxy.test/bc/y</x>"
    );
    // `<!-` and `<![` are told apart: neither `<![--` nor `<!-CDATA[` opens anything.
    let odd = "<![--https://api.bc.test/v2.0/t1/Production/x>";
    assert_eq!(rewrite(odd), odd);
}

#[test]
fn soap_envelopes_keep_everything_but_the_links() {
    let envelope = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header><a:Action s:mustUnderstand="1">urn:microsoft-dynamics-schemas/codeunit/Sales:Post</a:Action><a:To>https://api.bc.test/v2.0/t1/Production/WS/CRONUS/Codeunit/Sales</a:To></s:Header><s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring xml:lang="en-US">The field No. must have a value &lt;&gt; ''.</faultstring></s:Fault></s:Body></s:Envelope>"#;
    assert_eq!(rewrite(envelope), envelope.replace(FROM, TO));
}

/// A base with XML's special characters is escaped where references count, and
/// written raw inside CDATA, where they do not.
#[test]
fn the_replacement_is_escaped_for_its_context() {
    let links = LinkMap::new(FROM, "https://proxy.test/a&b'c/");
    assert_eq!(
        rewrite_with(
            &links,
            "<a href='https://api.bc.test/v2.0/t1/Production/x'>https://api.bc.test/v2.0/t1/Production/y<![CDATA[https://api.bc.test/v2.0/t1/Production/z]]></a>"
        ),
        "<a href='https://proxy.test/a&amp;b&apos;c/x'>https://proxy.test/a&amp;b&apos;c/y<![CDATA[https://proxy.test/a&b'c/z]]></a>"
    );
}

#[test]
fn xml_content_types_are_recognised() {
    for (value, xml) in [
        ("text/xml; charset=utf-8", true),
        ("application/xml", true),
        (
            "application/soap+xml; charset=utf-8; action=\"urn:x\"",
            true,
        ),
        ("Application/Atom+XML;type=feed", true),
        ("application/xhtml+xml", true),
        ("text/html", false),
        ("application/xml-dtd", false),
        ("application/json", false),
    ] {
        assert_eq!(super::super::is_xml(value.as_bytes()), xml, "{value}");
    }
}

/// Megabytes of text, long attribute values and long comments through the rewriter
/// in odd-sized chunks: what it holds never exceeds the prefix.
#[test]
fn huge_values_stream_through_a_bounded_buffer() {
    let links = links();
    let mut doc = String::from("<r a=\"");
    doc.push_str(FROM);
    doc.push_str(&"x".repeat(1_000_000));
    doc.push_str("\"><!--");
    doc.push_str(&"- ".repeat(500_000));
    doc.push_str("--><t>");
    doc.push_str(&"h".repeat(1_000_000));
    doc.push_str("</t><u>");
    doc.push_str(FROM);
    doc.push_str("</u></r>");
    let out = rewrite_chunks(&links, doc.as_bytes().chunks(4093));
    assert_eq!(out, doc.replace(FROM, TO));
}

// ---- generated documents ----

/// Where a generated value goes: what it may hold follows from that.
#[derive(Debug, Clone, Copy)]
enum Place {
    DoubleQuoted,
    SingleQuoted,
    Text,
    CData,
}

/// The starts of values: the upstream prefix in its spellings, and near misses.
fn head() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        FROM,
        "HTTPS://Api.BC.test/v2.0/t1/Production/",
        "https://api.bc.test:443/v2.0/t1/Production/",
        "https://api.bc.test/v2.0/t1/Production",
        "https://api.bc.test/v2.0/t1/production/",
        "https://api.bc.test:4443/v2.0/t1/Production/",
        "http://api.bc.test/v2.0/t1/Production/",
        "https://api.bc.test.evil/v2.0/t1/Production/",
        "https://api.bc.t",
        "",
        "",
    ])
}

fn token(place: Place) -> BoxedStrategy<&'static str> {
    let mut tokens = vec![
        "a",
        "Z9",
        "/",
        "?",
        "=",
        "%20",
        "é",
        " ",
        "\n",
        "$skiptoken=",
        FROM,
        "https://",
    ];
    match place {
        Place::DoubleQuoted => tokens.extend(["&amp;", "&quot;", "'", "&#47;", ">"]),
        Place::SingleQuoted => tokens.extend(["&amp;", "&apos;", "\"", "&#x2F;"]),
        Place::Text => tokens.extend(["&amp;", "&lt;", ">", "\"", "'", "]"]),
        Place::CData => tokens.extend(["<b a=\"1\">", "&", "]", "&amp;", "'"]),
    }
    prop::sample::select(tokens).boxed()
}

/// A value for `place` and what the rewriter must make of it.
fn value(place: Place) -> impl Strategy<Value = (String, String)> {
    (
        prop::sample::select(vec!["", "", " ", "\n  ", "\t"]),
        head(),
        prop::collection::vec(token(place), 0..5),
    )
        .prop_map(|(ws, head, rest)| {
            let value = format!("{ws}{head}{}", rest.concat());
            let expected = expected_value(&value);
            (value, expected)
        })
}

/// The oracle: plain string comparison, no streaming. Scheme and host match in any
/// case and with or without `:443`; the path exactly.
fn expected_value(value: &str) -> String {
    let body = value.trim_start_matches([' ', '\t', '\r', '\n']);
    let ws = &value[..value.len() - body.len()];
    for (prefix, authority) in [
        (FROM, "https://api.bc.test".len()),
        (
            "https://api.bc.test:443/v2.0/t1/Production/",
            "https://api.bc.test:443".len(),
        ),
    ] {
        if body.len() >= prefix.len()
            && body.as_bytes()[..authority].eq_ignore_ascii_case(&prefix.as_bytes()[..authority])
            && body.as_bytes()[authority..prefix.len()] == prefix.as_bytes()[authority..]
        {
            return format!("{ws}{TO}{}", &body[prefix.len()..]);
        }
    }
    value.to_owned()
}

/// Markup that is not data: copied whatever it holds.
fn opaque() -> impl Strategy<Value = String> {
    let url = format!("{FROM}x");
    prop_oneof![
        Just(format!("<!-- {url} ' \" > <a href=\"{url}\"/> - -->")),
        Just("<!---->".to_owned()),
        Just(format!("<?pi {url} \"? > ' >?>")),
        Just(format!("<?target href=\"{url}\"?>")),
    ]
}

fn name() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["", "soap:", "wsdl:", "xsd:", "a:", "xml:"]),
        prop::sample::select(vec!["address", "import", "id", "link", "To", "x"]),
    )
        .prop_map(|(p, n)| format!("{p}{n}"))
}

fn attribute() -> impl Strategy<Value = (String, String)> {
    (
        prop::sample::select(vec!["", "xmlns:", "xml:", "p:"]),
        prop::sample::select(vec!["location", "schemaLocation", "href", "base", "s"]),
        prop::sample::select(vec!["=", " = ", "=\n"]),
        prop_oneof![value(Place::DoubleQuoted), value(Place::SingleQuoted)],
        any::<bool>(),
    )
        .prop_map(|(prefix, name, eq, (value, expected), single)| {
            // A double-quoted value may hold `'` and the other way round; pick the
            // quote the value allows.
            let quote = if value.contains('"') || (single && !value.contains('\'')) {
                '\''
            } else {
                '"'
            };
            (
                format!(" {prefix}{name}{eq}{quote}{value}{quote}"),
                format!(" {prefix}{name}{eq}{quote}{expected}{quote}"),
            )
        })
}

#[derive(Debug, Clone)]
enum Node {
    Text(String, String),
    CData(String, String),
    Opaque(String),
    Element {
        name: String,
        attributes: Vec<(String, String)>,
        children: Vec<Node>,
    },
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        value(Place::Text).prop_map(|(v, e)| Node::Text(v, e)),
        value(Place::CData).prop_map(|(v, e)| Node::CData(v, e)),
        opaque().prop_map(Node::Opaque),
        (name(), prop::collection::vec(attribute(), 0..3)).prop_map(|(name, attributes)| {
            Node::Element {
                name,
                attributes,
                children: Vec::new(),
            }
        }),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        (
            name(),
            prop::collection::vec(attribute(), 0..3),
            prop::collection::vec(inner, 0..5),
        )
            .prop_map(|(name, attributes, children)| Node::Element {
                name,
                attributes,
                children,
            })
    })
}

/// Writes the document and the one expected from it.
fn write(node: &Node, doc: &mut String, expected: &mut String) {
    match node {
        Node::Text(v, e) => {
            doc.push_str(v);
            expected.push_str(e);
        }
        Node::CData(v, e) => {
            doc.push_str(&format!("<![CDATA[{v}]]>"));
            expected.push_str(&format!("<![CDATA[{e}]]>"));
        }
        Node::Opaque(markup) => {
            doc.push_str(markup);
            expected.push_str(markup);
        }
        Node::Element {
            name,
            attributes,
            children,
        } => {
            doc.push('<');
            doc.push_str(name);
            expected.push('<');
            expected.push_str(name);
            for (a, e) in attributes {
                doc.push_str(a);
                expected.push_str(e);
            }
            if children.is_empty() {
                doc.push_str("/>");
                expected.push_str("/>");
                return;
            }
            doc.push('>');
            expected.push('>');
            let mut last_text = false;
            for child in children {
                // Two text nodes in a row are one run of character data.
                let text = matches!(child, Node::Text(..));
                if text && last_text {
                    doc.push_str("<!---->");
                    expected.push_str("<!---->");
                }
                last_text = text;
                write(child, doc, expected);
            }
            doc.push_str(&format!("</{name}>"));
            expected.push_str(&format!("</{name}>"));
        }
    }
}

fn document() -> impl Strategy<Value = (String, String)> {
    (
        any::<bool>(),
        prop::collection::vec(opaque(), 0..2),
        node(),
    )
        .prop_map(|(prolog, misc, root)| {
            let mut doc = String::new();
            let mut expected = String::new();
            if prolog {
                let head = format!(
                    "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<!DOCTYPE r [<!ENTITY e \"{FROM}>\"><!-- ' ]> --><?p ]>?>]>\n"
                );
                doc.push_str(&head);
                expected.push_str(&head);
            }
            for markup in &misc {
                doc.push_str(markup);
                expected.push_str(markup);
            }
            write(&root, &mut doc, &mut expected);
            (doc, expected)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Every value that starts with the upstream prefix is rewritten and every other
    /// byte is kept, whatever byte the chunks are split at.
    #[test]
    fn generated_documents_rewrite_exactly_the_upstream_links((doc, expected) in document()) {
        prop_assert_eq!(rewrite(&doc), expected);
    }

    /// The same documents compressed, in chunks of any size, through the body
    /// rewriter as a response body.
    #[test]
    fn generated_documents_rewrite_when_compressed(
        (doc, expected) in document(),
        coding in prop::sample::select(vec!["gzip", "deflate", "deflate-raw", "br"]),
        chunk in 1usize..64,
    ) {
        let compressed = compress(coding, doc.as_bytes());
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/soap+xml; charset=utf-8"));
        let encoding = if coding == "deflate-raw" { "deflate" } else { coding };
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_str(encoding).unwrap());
        let mut rewriter = prepare(links(), &mut headers, true).unwrap();
        prop_assert!(!headers.contains_key(header::CONTENT_ENCODING));
        let mut input = compressed.chunks(chunk);
        let mut out = Vec::new();
        while !rewriter.is_done() {
            match rewriter.next().unwrap() {
                Some(piece) => out.extend_from_slice(&piece),
                None => match input.next() {
                    Some(c) => rewriter.push(Bytes::copy_from_slice(c)),
                    None => rewriter.end_input(),
                },
            }
        }
        prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
    }
}

fn compress(coding: &str, data: &[u8]) -> Vec<u8> {
    match coding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "deflate-raw" => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        _ => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(data).unwrap();
            }
            out
        }
    }
}
