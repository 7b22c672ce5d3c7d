"""``perfusion redis up|down|status``: the local Redis server for Feast's Redis online store."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "redis",
        help="start, stop or inspect the local Redis server (Feast online store)",
        description="Debian's redis-server on a loopback port (installed with apt-get when missing and run as "
        "root). State and logs live under $PERFUSION_STATE_DIR/redis; its URL is written to the file 'url' there.",
    )
    actions = parser.add_subparsers(dest="redis_action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start Redis in the background and wait for PING")
    up.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    actions.add_parser("down", help="stop the Redis server this project started")
    actions.add_parser("status", help="print running/stopped, pid and URL (exit 3 when stopped)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from harness.infra.redis_server import RedisServer, RedisServerConfig

    action = args.redis_action
    if action == "up":
        server = RedisServer(RedisServerConfig(port=args.port))
        before = server.status()
        if before.running:
            print(f"already running: pid {before.pid}, url {before.address}")
            return 0
        after = server.start()
        print(f"Redis up: pid {after.pid}, url {after.address}; logs in {server.state_dir}")
        return 0
    server = RedisServer()
    if action == "down":
        pid = server.status().pid
        print(f"stopped Redis (pid {pid})" if server.stop() else "Redis was not running")
        return 0
    current = server.status()
    print(current.describe())
    return 0 if current.running else 3
