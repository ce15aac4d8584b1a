"""WebSocket on real loopback sockets (wsproto as the client): 101, echo, rules, pings, fragments."""

from __future__ import annotations

import hashlib
import socket

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, Request, TextMessage

import c2served
from nftdivert.services import websocket


c2 = pytest.fixture(c2served.served, name="c2")


class Client:
    def __init__(self, port: int, host: str, path: str, subprotocols=()) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=host, target=path, subprotocols=list(subprotocols))))
        self.accepted = self.next(AcceptConnection)

    def next(self, kind):
        while True:
            for event in self.ws.events():
                if isinstance(event, kind):
                    return event
            data = self.sock.recv(65536)
            assert data, "closed"
            self.ws.receive_data(data)

    def send(self, *events) -> None:
        self.sock.sendall(b"".join(self.ws.send(e) for e in events))

    def close(self) -> None:
        self.send(CloseConnection(code=1000))
        self.next(CloseConnection)
        self.sock.close()


def test_messages_are_echoed_and_logged_with_size_hash_and_first_bytes(c2):
    client = Client(c2.port, "ws.example", "/gate", subprotocols=["chat", "x"])
    assert client.accepted.subprotocol == "chat"  # the first one offered: a client may insist on one
    client.send(TextMessage(data="hello"), BytesMessage(data=bytes(range(200))))
    assert client.next(TextMessage).data == "hello"
    assert client.next(BytesMessage).data == bytes(range(200))
    client.close()
    (upgrade,) = c2.of("http")
    assert upgrade["status"] == 101 and upgrade["url"] == "ws://ws.example/gate"
    text, binary = c2.of("websocket", 2)
    assert (text["opcode"], text["size"], text["head"], text["answered"]) == ("text", 5, b"hello".hex(), "echo")
    assert binary["sha256"] == hashlib.sha256(bytes(range(200))).hexdigest() and binary["head"] == bytes(range(64)).hex()


def test_a_rule_for_the_host_and_path_answers_each_message(c2):
    client = Client(c2.port, "tasks.example", "/ws")
    client.send(TextMessage(data="ready"))
    assert client.next(TextMessage).data == "run calc.exe"
    client.close()
    assert c2.of("websocket")[0]["answered"] == "rule"


def test_pings_get_pongs_and_fragments_are_one_message(c2):
    client = Client(c2.port, "ws.example", "/")
    client.send(Ping(payload=b"p"))
    assert client.next(Pong).payload == b"p"
    client.send(TextMessage(data="frag", message_finished=False), TextMessage(data="ment"))
    assert client.next(TextMessage).data == "fragment"
    client.close()
    assert [(r["size"], r["opcode"]) for r in c2.of("websocket")] == [(8, "text")]


def test_a_message_beyond_the_limit_closes_with_1009_and_is_logged(c2, monkeypatch):
    monkeypatch.setattr(websocket, "MAX_MESSAGE", 1000)  # the listener runs in this process
    client = Client(c2.port, "ws.example", "/")
    client.send(BytesMessage(data=b"x" * 600, message_finished=False), BytesMessage(data=b"x" * 600))
    assert client.next(CloseConnection).code == 1009
    assert "beyond 1000 bytes" in c2.of("websocket")[0]["error"]
