"""A real SOAP client for tests/soap.rs: zeep (PyPI) builds itself from a WSDL.

Usage: zeep_client.py WSDL_URL USER PASSWORD [wsa]

Fetches the WSDL (and whatever it imports) from WSDL_URL with Basic credentials, calls
`Post("S-ORD101001")` at the address the WSDL names, then `Post("missing")`, which must
answer a SOAP fault. With `wsa`, requests carry WS-Addressing headers (zeep's
WsAddressingPlugin: `wsa:To` is the address the WSDL names). Prints one JSON object:
every URL the client requested, the service address, the result and the fault.
"""

import json
import sys

import requests
import zeep
from zeep.transports import Transport


def main():
    wsdl_url, user, password = sys.argv[1:4]
    fetched = []
    session = requests.Session()
    session.auth = (user, password)
    session.hooks["response"].append(lambda r, *a, **k: fetched.append(r.request.url))
    plugins = []
    if "wsa" in sys.argv[4:]:
        from zeep.wsa import WsAddressingPlugin

        plugins.append(WsAddressingPlugin())
    client = zeep.Client(wsdl_url, transport=Transport(session=session), plugins=plugins)
    service = client.bind("Sales", "Application")
    address = service._binding_options["address"]
    invoice = service.Post("S-ORD101001")
    out = {
        "address": address,
        "number": invoice.number,
        "lines": invoice.lines,
        "link": invoice.link,
    }
    try:
        service.Post("missing")
        out["fault"] = None
    except zeep.exceptions.Fault as fault:
        out["fault"] = {"message": fault.message, "code": fault.code}
    out["fetched"] = fetched
    print(json.dumps(out))


if __name__ == "__main__":
    main()
