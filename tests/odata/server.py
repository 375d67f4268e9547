"""A real OData v4 service (odatapy 5.3.0, a port of Apache Olingo) for tests/odata_real.rs.

Serves `Products` (1,200 entities, ETags, server-driven paging of 100, keys generated on
POST) and `$batch` on 127.0.0.1 at a free port, which it prints as `PORT <n>` once it
listens. Runs until its standard input closes (the test process ends).
"""

import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from odatapy.data import Entity, Property
from odatapy.edm.xml_io import XmlEdmProvider
from odatapy.server import OData
from odatapy.server.adapters import ODataWSGIApp
from odatapy.server.inmemory import InMemoryDataStore, InMemoryProcessor

METADATA = """<?xml version="1.0" encoding="utf-8"?>
<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">
  <edmx:DataServices>
    <Schema Namespace="Shop" xmlns="http://docs.oasis-open.org/odata/ns/edm">
      <EntityType Name="Product">
        <Key><PropertyRef Name="ID"/></Key>
        <Property Name="ID" Type="Edm.Int32" Nullable="false"/>
        <Property Name="Name" Type="Edm.String"/>
      </EntityType>
      <EntityContainer Name="Container">
        <EntitySet Name="Products" EntityType="Shop.Product"/>
      </EntityContainer>
    </Schema>
  </edmx:DataServices>
</edmx:Edmx>
"""


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def main():
    odata = OData.new_instance()
    metadata = odata.create_service_metadata(XmlEdmProvider(METADATA))
    handler = odata.create_handler(metadata)
    store = InMemoryDataStore()
    products = []
    for n in range(1, 1201):
        entity = Entity(
            type="Shop.Product",
            properties=[Property(name="ID", value=n), Property(name="Name", value=f"p{n}")],
        )
        entity.etag = 'W/"1"'
        products.append(entity)
    store.set_entities("Products", products)
    store.declare_key_auto_generating("Products")
    handler.register(InMemoryProcessor(store, page_size=100))
    app = ODataWSGIApp(handler, mount_path="/shop")
    server = make_server("127.0.0.1", 0, app, server_class=Server, handler_class=QuietHandler)
    print(f"PORT {server.server_address[1]}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()


if __name__ == "__main__":
    main()
