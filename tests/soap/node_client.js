// A real SOAP client for tests/soap.rs: the npm `soap` package builds itself from a WSDL.
//
// Usage: node node_client.js WSDL_URL USER PASSWORD
//
// Fetches the WSDL (and the schema it imports) from WSDL_URL with Basic credentials,
// calls `Post("S-ORD101001")` at the address the WSDL names, then `Post("missing")`,
// which must answer a SOAP fault. Prints one JSON object: every URL the client
// requested, the service address, the result and the fault. Installed by
// `npm ci --prefix tests/soap` (pinned by package-lock.json).
'use strict';

const soap = require('soap');

async function main() {
    const [wsdlUrl, user, password] = process.argv.slice(2);
    const fetched = [];
    // Every request the client makes, WSDL, imports and calls, goes through its
    // HttpClient: record the URL of each.
    class RecordingHttpClient extends soap.HttpClient {
        request(rurl, ...rest) {
            fetched.push(rurl);
            return super.request(rurl, ...rest);
        }
    }
    const basic = 'Basic ' + Buffer.from(`${user}:${password}`).toString('base64');
    const client = await soap.createClientAsync(wsdlUrl, {
        httpClient: new RecordingHttpClient(),
        // Sent with the WSDL and with every document it imports.
        wsdl_headers: { Authorization: basic },
    });
    client.setSecurity(new soap.BasicAuthSecurity(user, password));
    const address = client.wsdl.definitions.services.Sales.ports.Application.location;
    const [answer] = await client.PostAsync({ documentNo: 'S-ORD101001' });
    const invoice = answer.PostResult;
    const out = {
        address,
        number: invoice.number,
        lines: invoice.lines,
        link: invoice.link,
    };
    try {
        await client.PostAsync({ documentNo: 'missing' });
        out.fault = null;
    } catch (error) {
        const fault = error.root && error.root.Envelope.Body.Fault;
        if (!fault) {
            throw error;
        }
        out.fault = { code: fault.faultcode, message: fault.faultstring };
    }
    out.fetched = fetched;
    console.log(JSON.stringify(out));
}

main().catch((error) => {
    console.error(error && error.stack ? error.stack : error);
    process.exit(1);
});
