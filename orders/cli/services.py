"""Commands that run or prepare the services: each service in this process, migrations, roles, health,
the effective settings."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import sys
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orders import local_stack, migrations, roles, security
from orders.cli.reach import refuse, unreachable_database
from orders.config import Settings, describe, masked, variable


def run_module(module: str) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        importlib.import_module(f"{module}.__main__").main()
        return 0

    return run


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    problem = unreachable_database(args, settings, server_only=True)
    if problem:
        return refuse(problem)
    try:
        asyncio.run(migrations.migrate(settings))
    except migrations.Unusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("schemas of the write and read databases are up to date")
    return 0


def cmd_create_roles(args: argparse.Namespace, settings: Settings) -> int:
    problem = unreachable_database(args, settings)
    if problem:
        return refuse(problem)
    asyncio.run(roles.apply(settings))
    print(f"roles {roles.COMMAND}, {roles.PROJECTOR} and {roles.QUERY} are in place with their grants")
    return 0


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    if args.address.startswith("http://"):  # the gateway: its /api/health answers 200 while it serves
        ok = local_stack.http_ok(args.address, timeout=args.timeout)
        print(f"{args.address}: {'OK' if ok else 'no answer'}")
        return 0 if ok else 1
    with security.client_channel(args.address, settings) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=security.call_metadata(settings),
            )
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as err:
            status = f"no answer ({err.code().name})"
    print(f"{args.address}{' ' + args.service if args.service else ''}: {status}")
    return 0 if status == "SERVING" else 1


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    if args.defaults:
        for name, default, doc in describe():
            print(f"{name:34} {default:50} {doc}")
        return 0
    for f in dataclasses.fields(Settings):
        value = masked(f.name, getattr(settings, f.name)) or "(empty)"
        print(f"{variable(f.name):34} {value:50} {args.sources[f.name]}".rstrip())
    return 0
