"""A real S3 server on this machine for the tests: moto's ThreadedMotoServer on loopback."""

import os
import socket

import boto3
from moto.server import ThreadedMotoServer

# Fake credentials and a region: moto accepts any; the AWS clients need them to sign.
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-logged",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> tuple[ThreadedMotoServer, dict[str, str]]:
    """Starts a server on a free loopback port; returns it and the environment to use it."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, {**ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}


def create_bucket(name: str) -> None:
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
