"""A real SOAP upstream for tests/soap.rs: a spyne (PyPI) service on 127.0.0.1.

Usage: spyne_server.py LOG_FILE. Prints "PORT <n>" once listening on a free port.

The service `Sales` has one operation, `Post(documentNo)`, answering an `Invoice`
whose `link` is an absolute URL on this server (as Business Central writes them);
`Post("missing")` answers a SOAP fault. A thin WSGI layer around spyne:
- refuses (401) any request without the proxy's bearer token (`Bearer tok-...`),
  so a client that bypassed the proxy would fail;
- moves the `Invoice` type's schema out of the WSDL into its own document
  (`?xsd=types`), imported with an absolute `schemaLocation`, so clients must follow
  an `xsd:import`;
- gzips the WSDL and the XSD when the caller accepts it;
- appends one JSON line per request to LOG_FILE: method, path, query, the
  `Authorization` header, `SOAPAction`, `Content-Type` and any WS-Addressing `To`.
"""

import gzip
import io
import json
import logging
import re
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from lxml import etree
from spyne import Application, ComplexModel, Fault, Integer, ServiceBase, Unicode, rpc
from spyne.protocol.soap import Soap11
from spyne.server.wsgi import WsgiApplication

TYPES_NS = "urn:s2s-proxy-test:types"
XS = "http://www.w3.org/2001/XMLSchema"
WSDL = "http://schemas.xmlsoap.org/wsdl/"


class Invoice(ComplexModel):
    __namespace__ = TYPES_NS
    number = Unicode
    lines = Integer
    link = Unicode


class Sales(ServiceBase):
    @rpc(Unicode, _returns=Invoice)
    def Post(ctx, documentNo):
        if documentNo == "missing":
            raise Fault(
                faultcode="Client.NotFound",
                faultstring="The Sales Header does not exist. No.='missing'",
            )
        env = ctx.transport.req_env
        base = "http://%s%s" % (env["HTTP_HOST"], env["PATH_INFO"].split("/WS/")[0])
        return Invoice(
            number="S-INV-" + documentNo,
            lines=3,
            link="%s/ODataV4/Company('CRONUS')/SalesInvoices('S-INV-%s')" % (base, documentNo),
        )


application = Application(
    [Sales],
    tns="urn:microsoft-dynamics-schemas/codeunit/Sales",
    in_protocol=Soap11(validator="lxml"),
    out_protocol=Soap11(),
)
spyne_app = WsgiApplication(application)


def url_of(env):
    return "http://%s%s" % (env["HTTP_HOST"], env["PATH_INFO"])


def split_wsdl(env):
    """spyne's WSDL with the types schema moved out: (wsdl, xsd) as bytes."""
    inner = dict(env, REQUEST_METHOD="GET", QUERY_STRING="wsdl")
    body = b"".join(spyne_app(inner, lambda status, headers: None))
    root = etree.fromstring(body)
    types = root.find("{%s}types" % WSDL)
    schema = next(s for s in types.findall("{%s}schema" % XS) if s.get("targetNamespace") == TYPES_NS)
    types.remove(schema)
    for imp in root.iter("{%s}import" % XS):
        if imp.get("namespace") == TYPES_NS:
            imp.set("schemaLocation", url_of(env) + "?xsd=types")
    wsdl = etree.tostring(root, xml_declaration=True, encoding="utf-8")
    # A standalone schema declares the prefixes its QName values use (`s0:Invoice`).
    standalone = etree.Element(schema.tag, attrib=dict(schema.attrib), nsmap=dict(schema.nsmap, s0=TYPES_NS))
    standalone.extend(list(schema))
    xsd = etree.tostring(standalone, xml_declaration=True, encoding="utf-8")
    return wsdl, xsd


def log(path, entry):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def make_app(log_path):
    def app(env, start_response):
        body = b""
        if env["REQUEST_METHOD"] == "POST":
            length = int(env.get("CONTENT_LENGTH") or 0)
            body = env["wsgi.input"].read(length)
        to = re.search(rb"<(?:\w+:)?To\b[^>]*>([^<]*)</", body)
        log(log_path, {
            "method": env["REQUEST_METHOD"],
            "path": env["PATH_INFO"],
            "query": env.get("QUERY_STRING", ""),
            "authorization": env.get("HTTP_AUTHORIZATION"),
            "soapaction": env.get("HTTP_SOAPACTION"),
            "content_type": env.get("CONTENT_TYPE"),
            "wsa_to": to.group(1).decode() if to else None,
        })
        if not (env.get("HTTP_AUTHORIZATION") or "").startswith("Bearer tok-"):
            start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer"), ("Content-Length", "0")])
            return [b""]
        query = env.get("QUERY_STRING", "")
        if env["REQUEST_METHOD"] == "GET" and query.lower() in ("wsdl", "xsd=types"):
            wsdl, xsd = split_wsdl(env)
            doc = wsdl if query.lower() == "wsdl" else xsd
            headers = [("Content-Type", "text/xml; charset=utf-8")]
            if "gzip" in env.get("HTTP_ACCEPT_ENCODING", ""):
                doc = gzip.compress(doc)
                headers.append(("Content-Encoding", "gzip"))
            headers.append(("Content-Length", str(len(doc))))
            start_response("200 OK", headers)
            return [doc]
        env = dict(env, **{"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))})
        return spyne_app(env, start_response)

    return app


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main():
    # spyne logs every fault it answers with a traceback; the tests expect faults.
    logging.disable(logging.CRITICAL)
    server = make_server("127.0.0.1", 0, make_app(sys.argv[1]), server_class=ThreadingServer, handler_class=Quiet)
    print("PORT %d" % server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
