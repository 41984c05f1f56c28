"""The `kvstore` command.

    kvstore up       an embedded local cluster and the HTTP service, in the foreground
    kvstore serve    the controller and the HTTP service on a running Ray cluster (KubeRay head)
    kvstore status   a running service's stats, readable
    kvstore demo     disaggregated prefill/decode and prefix reuse on a small model
    kvstore config   the effective settings, or the table of every setting

Ray is imported only by `up` and `serve`.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
import urllib.error
import urllib.request

from kvstore.config import Config, load_config, markdown_table
from kvstore.errors import KVStoreError
from kvstore.tenants import Tenants
from kvstore.tls import TLS

log = logging.getLogger("kvstore")


def _settings(args) -> tuple[Config, dict]:
    overrides = {}
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise KVStoreError(f"--set {item!r} must look like NAME=VALUE")
        overrides[name.strip()] = value
    return load_config(args.config, **overrides), overrides


def _service_url(config: Config, tls: TLS | None) -> str:
    return f"{'https' if tls else 'http'}://{config.http_host}:{config.http_port}"


def _with_token(config: Config) -> tuple[Config, bool]:
    if config.token():
        return config, False
    return dataclasses.replace(config, auth_token=secrets.token_urlsafe(24)), True


def _run_service(client, config: Config, generated_token: bool, what: str) -> int:
    from kvstore.service import Service, serve

    token = config.token()
    tls = TLS.from_config(config)
    url = _service_url(config, tls)
    nodes = client.nodes()
    print(f"kvstore is up ({what}): {len(nodes)} node{'s' if len(nodes) != 1 else ''}, "
          f"namespace {config.namespace!r}")
    # No credential in any URL: the page asks for it (any user name, the token as the password).
    print(f"  status page   {url}/  (the browser asks: any user name, the auth token as password)")
    print(f"  metrics       curl{' --cacert ' + tls.ca_file if tls and tls.ca_file else ''} "
          f"-H 'Authorization: Bearer <token>' {url}/metrics")
    if generated_token:
        print(f"  auth token    {token}  (generated; set auth_token or auth_token_file to choose one)")
    print("Ctrl-C stops it.", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(Service(client, Tenants(token, config.tenants_file)), config.http_host, config.http_port, stop,
                    tls.server_context() if tls else None)

    try:
        asyncio.run(main())
    finally:
        print("stopping...", flush=True)
        client.close(shutdown_cluster=True)
    return 0


def cmd_up(args) -> int:
    from kvstore.cluster.client import connect

    config, _ = _settings(args)
    config, generated = _with_token(config)
    # One embedded node: it takes every setting of this command, file included.
    node_settings = {k: v for k, v in config.to_dict().items() if k not in ("auth_token", "auth_token_file")}
    client = connect(config=dataclasses.replace(config, ray_address=""), node_overrides=node_settings)
    return _run_service(client, config, generated, "embedded local Ray")


def cmd_serve(args) -> int:
    from kvstore.cluster.client import connect

    config, overrides = _settings(args)
    if args.address:
        config = dataclasses.replace(config, ray_address=args.address)
    if not config.ray_address:
        raise KVStoreError("serve joins a running Ray cluster: give --address or set ray_address "
                           "(for a local cluster of your own, use `kvstore up`)")
    config, generated = _with_token(config)
    # Node actors read their own node's settings (worker groups differ); only --set travels.
    client = connect(config=config, node_overrides=overrides)
    return _run_service(client, config, generated, f"Ray at {config.ray_address}")


def cmd_status(args) -> int:
    config = load_config(args.config)
    tls = TLS.from_config(config)
    url = (args.url or _service_url(config, tls)).rstrip("/")
    token = args.token or config.token()
    request = urllib.request.Request(f"{url}/v1/stats", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30, context=tls.client_context() if tls else None) as response:
            stats = json.load(response)
    except urllib.error.HTTPError as e:
        print(f"kvstore status: {url} answered {e.code}: {e.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"kvstore status: cannot reach {url}: {e.reason} (is `kvstore up` running?)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    holds = sum(n.get("holds", 0) for n in stats["nodes"].values())
    print(f"{stats['nodes_registered']} nodes, {stats['index_keys']:,} blocks indexed, "
          f"{holds} holds (reservations, pins, handoff leases), {stats['nodes_dropped']} nodes lost")
    for node_id, node in sorted(stats["nodes"].items()):
        if "error" in node:
            print(f"  {node_id[:12]}  unreachable: {node['error']}")
            continue
        store = node["store"]
        tiers = ", ".join(f"{t['name']} {t['used_slots']}/{t['slots']}" for t in store["tiers"])
        print(f"  {node_id[:12]}  {node['address']:<21}  {store['blocks']:>8,} blocks  [{tiers}]  "
              f"hits {store['hits']:,}/{store['gets']:,}  sent {node['dataplane']['bytes_sent']:,} B")
    return 0


def cmd_demo(args) -> int:
    from kvstore.connectors.demo import main as demo

    return demo(args.demo_args)


def cmd_config(args) -> int:
    if args.markdown:
        print(markdown_table(), end="")
        return 0
    config, _ = _settings(args)
    shown = {k: ("<set>" if k == "auth_token" and v else v) for k, v in config.to_dict().items()}
    print(json.dumps(shown, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore", description="A distributed, tiered KV-cache store for LLM inference.",
        epilog="Settings: a YAML file (--config, or $KVSTORE_CONFIG), KVSTORE_<NAME> variables, --set NAME=VALUE; "
               "see `kvstore config --markdown`.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_settings(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE", default=None, help="YAML settings file (default: $KVSTORE_CONFIG)")
        p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one setting; repeatable")
        return p

    up = with_settings(sub.add_parser("up", help="run an embedded local cluster and the HTTP service (foreground)",
                                      description="Starts a local Ray with one node, the kvstore controller and "
                                                  "node actor, and the HTTP service; Ctrl-C stops everything."))
    up.set_defaults(func=cmd_up)
    serve = with_settings(sub.add_parser("serve", help="run the controller and HTTP service on a running Ray cluster",
                                         description="Joins the Ray cluster at --address (or ray_address), starts "
                                                     "the controller, which puts a node actor on every Ray node, and "
                                                     "serves HTTP; Ctrl-C stops the service and the node actors."))
    serve.add_argument("--address", help="Ray cluster address, e.g. 127.0.0.1:6379 (default: ray_address)")
    serve.set_defaults(func=cmd_serve)
    status = sub.add_parser("status", help="print a running service's stats")
    status.add_argument("--url", help="service URL (default: http://http_host:http_port, https with TLS settings)")
    status.add_argument("--token", help="auth token (default: auth_token / auth_token_file)")
    status.add_argument("--config", metavar="FILE", default=None, help="YAML settings file (default: $KVSTORE_CONFIG)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=cmd_status)
    demo = sub.add_parser("demo", help="disaggregated prefill/decode and prefix reuse on a small model",
                          description="Runs the demo (see `kvstore demo -- --help` for its options).")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help="options for the demo")
    demo.set_defaults(func=cmd_demo)
    config = with_settings(sub.add_parser("config", help="print the effective settings"))
    config.add_argument("--markdown", action="store_true", help="print the table of every setting instead")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) is None:
        args.config = os.environ.get("KVSTORE_CONFIG") or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KVStoreError as e:
        print(f"kvstore: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
