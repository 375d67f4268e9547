//! WS-Addressing `To` in SOAP requests: the proxy's URL becomes the upstream's.
//!
//! A client using WS-Addressing writes the address it sends to into the envelope
//! (`<wsa:To>`, WS-Addressing 1.0 SOAP Binding §3.5; Dataverse's Organization Service
//! expects it). Through the proxy that address is the proxy's, and a server that checks
//! `To` against its own address (WCF's address filter) refuses the message. So the text of
//! every `To` element that starts with the route's public URL gets the route's upstream
//! URL instead, as the body streams; nothing else in the envelope changes. Only SOAP
//! requests are looked at: `application/soap+xml` (SOAP 1.2), or `text/xml` with a
//! `SOAPAction` header (SOAP 1.1 §6.1.1), in no content coding.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, header};

use super::LinkMap;
use super::xml::XmlRewriter;

/// Whether a request is a SOAP message whose envelope the proxy can read.
pub(crate) fn is_soap_request(headers: &HeaderMap) -> bool {
    let coded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
    let Some(content_type) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let media = super::media_type(content_type.as_bytes());
    !coded
        && (media == b"application/soap+xml"
            || (media == b"text/xml" && headers.contains_key("soapaction")))
}

/// Translates the `To` headers of one request envelope.
#[derive(Debug)]
pub(crate) struct AddressingRewriter {
    links: LinkMap,
    xml: XmlRewriter,
}

impl AddressingRewriter {
    /// `public` is the route's URL on the proxy (public base plus route prefix), `upstream`
    /// the route's upstream URL.
    pub(crate) fn new(public: &str, upstream: &str) -> Self {
        let links = LinkMap::new(public, upstream);
        let xml = XmlRewriter::element_text(&links, b"To");
        Self { links, xml }
    }

    /// The translation of the next piece of the body (bytes that may start an address are
    /// held until the next piece or [`finish`](Self::finish)).
    pub(crate) fn push(&mut self, data: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(data.len());
        self.xml.push(&self.links, data, &mut out);
        out.freeze()
    }

    /// The end of the body: whatever is held.
    pub(crate) fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        self.xml.finish(&mut out);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn translate(envelope: &str) -> String {
        let whole = {
            let mut rewriter = AddressingRewriter::new(
                "http://proxy.test/crm/",
                "https://org.crm.test/XRMServices/2011/",
            );
            let mut out = rewriter.push(envelope.as_bytes()).to_vec();
            out.extend_from_slice(&rewriter.finish());
            String::from_utf8(out).unwrap()
        };
        for at in 0..=envelope.len() {
            let mut rewriter = AddressingRewriter::new(
                "http://proxy.test/crm/",
                "https://org.crm.test/XRMServices/2011/",
            );
            let mut out = rewriter.push(&envelope.as_bytes()[..at]).to_vec();
            out.extend_from_slice(&rewriter.push(&envelope.as_bytes()[at..]));
            out.extend_from_slice(&rewriter.finish());
            assert_eq!(String::from_utf8(out).unwrap(), whole, "split at {at}");
        }
        whole
    }

    #[test]
    fn to_headers_naming_the_proxy_name_the_upstream() {
        let envelope = r#"<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header><a:Action s:mustUnderstand="1">http://schemas.microsoft.com/xrm/2011/Contracts/Services/IOrganizationService/Execute</a:Action><a:ReplyTo><a:Address>http://www.w3.org/2005/08/addressing/anonymous</a:Address></a:ReplyTo><a:To s:mustUnderstand="1">HTTP://Proxy.Test:80/crm/Organization.svc/web</a:To></s:Header><s:Body><Execute><request><Url>http://proxy.test/crm/Organization.svc/web</Url></request></Execute></s:Body></s:Envelope>"#;
        assert_eq!(
            translate(envelope),
            envelope.replace(
                "HTTP://Proxy.Test:80/crm/Organization.svc/web</a:To>",
                "https://org.crm.test/XRMServices/2011/Organization.svc/web</a:To>"
            )
        );
    }

    #[test]
    fn other_addresses_attributes_and_empty_to_elements_are_left_alone() {
        for envelope in [
            r#"<Envelope><Header><To>https://elsewhere.test/crm/x</To></Header></Envelope>"#,
            r#"<Envelope><Header><wsa:To/>http://proxy.test/crm/x</Header></Envelope>"#,
            r#"<Envelope><Header><Top>http://proxy.test/crm/x</Top><a:To x="http://proxy.test/crm/y">z</a:To></Header></Envelope>"#,
            r#"<Envelope><Header><To>http://proxy.test/other/x</To><To><!-- c -->http://proxy.test/crm/x</To></Header></Envelope>"#,
            r#"<Envelope><Header><a:ToX>http://proxy.test/crm/x</a:ToX></Header></Envelope>"#,
        ] {
            assert_eq!(translate(envelope), envelope);
        }
    }

    #[test]
    fn only_soap_requests_are_translated() {
        let soap = |content_type: &'static str, action: bool, coding: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            if action {
                headers.insert("soapaction", HeaderValue::from_static("\"urn:x\""));
            }
            if let Some(coding) = coding {
                headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
            }
            is_soap_request(&headers)
        };
        assert!(soap(
            "application/soap+xml; charset=utf-8; action=\"urn:x\"",
            false,
            None
        ));
        assert!(soap("text/xml; charset=utf-8", true, None));
        assert!(soap("Text/XML", true, Some("identity")));
        assert!(!soap("text/xml", false, None));
        assert!(!soap("application/xml", true, None));
        assert!(!soap("application/json", true, None));
        assert!(!soap("application/soap+xml", false, Some("gzip")));
        assert!(!is_soap_request(&HeaderMap::new()));
    }
}
