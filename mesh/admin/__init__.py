"""The operator's side of a node: gRPC clients (`client`), tables and JSON for people and scripts
(`format`), and the Admin servicer a node runs (`service`). The `mesh admin` commands are `mesh.cli.admin`."""
