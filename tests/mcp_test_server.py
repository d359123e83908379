"""A small MCP server built with the SDK's MCPServer, for the transports mcp-server-git cannot exercise:
streamable HTTP (`http`: serves on 127.0.0.1, an ephemeral port it prints on its first stdout line), a
server that dies in the middle of a call (`stdio`: its `crash` tool exits the process with code 7) and one
that answers late (`slow`).

    python tests/mcp_test_server.py http | stdio
"""

from __future__ import annotations

import os
import socket
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ToolAnnotations

server = MCPServer("loopterm-test", log_level="WARNING")


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def shout(text: str) -> str:
    """Echo the text in upper case."""
    return text.upper()


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
async def slow(seconds: float) -> str:
    """Answer after this many seconds."""
    await anyio.sleep(seconds)
    return f"slept {seconds}"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def whoami(ctx: Context) -> str:
    """The Authorization header this call came with."""
    return (ctx.headers or {}).get("authorization", "(none)")


@server.tool()
def crash() -> str:
    """Exit the server process in the middle of the call."""
    sys.stdout.flush()
    os._exit(7)


async def serve_http() -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    app = server.streamable_http_app()
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(sock.getsockname()[1], flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


if __name__ == "__main__":
    if sys.argv[1:] == ["http"]:
        anyio.run(serve_http)
    else:
        server.run()
