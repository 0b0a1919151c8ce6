"""The reference for benches/watch_fanout.rs: a single-threaded asyncio stand-in for the part of
a Consul server that blocking queries exercise, with no Raft, no TLS and no persistence.

  PUT /v1/catalog/register             store one instance (node, service, check); bump the index
  GET /v1/health/service/<name>        the instances, with X-Consul-Index; ?index=N&wait=Ds parks
                                       until the service changes or the wait ends
  GET /v1/agent/metrics                {"Gauges": [{"Name": "trellis.http.blocking_queries", ...}]}

Run: python3 blocking_ref.py <port>. It is what "a simple server" achieves on this machine, so
the benchmark reports Trellis against it in the same run.
"""

import asyncio
import json
import re
import sys
import time

instances = {}   # service -> {(node, id): entry}
service_index = {}
index = 1
events = {}      # service -> asyncio.Event, replaced at every change
parked = 0


def duration(s):
    m = re.fullmatch(r"(\d+)(ms|s|m)?", s or "")
    if not m:
        return 300.0
    n = int(m.group(1))
    return {"ms": n / 1000, "s": n, "m": n * 60, None: n}[m.group(2)]


def answer(service):
    rows = [e for e in instances.get(service, {}).values()]
    return json.dumps(rows).encode()


async def handle(reader, writer):
    global index, parked
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for l in lines[1:]:
                if l.lower().startswith("content-length:"):
                    length = int(l.split(":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            path, _, query = target.partition("?")
            params = dict(p.split("=", 1) if "=" in p else (p, "") for p in query.split("&") if p)
            if method == "PUT" and path == "/v1/catalog/register":
                r = json.loads(body)
                svc = r["Service"]
                index += 1
                instances.setdefault(svc["Service"], {})[(r["Node"], svc.get("ID", svc["Service"]))] = {
                    "Node": {"Node": r["Node"], "Address": r["Address"]},
                    "Service": svc,
                    "Checks": [r.get("Check")],
                }
                service_index[svc["Service"]] = index
                ev = events.pop(svc["Service"], None)
                if ev:
                    ev.set()
                out, idx = b"true", index
            elif method == "GET" and path.startswith("/v1/health/service/"):
                svc = path[len("/v1/health/service/"):]
                want = int(params.get("index", "0") or 0)
                if want and service_index.get(svc, 1) == want:
                    ev = events.setdefault(svc, asyncio.Event())
                    parked += 1
                    try:
                        await asyncio.wait_for(ev.wait(), duration(params.get("wait")))
                    except asyncio.TimeoutError:
                        pass
                    parked -= 1
                out, idx = answer(svc), service_index.get(svc, 1)
            elif path == "/v1/agent/metrics":
                out = json.dumps({"Gauges": [{"Name": "trellis.http.blocking_queries", "Value": parked}]}).encode()
                idx = index
            else:
                out, idx = b"not found", index
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: %d\r\nContent-Length: %d\r\n\r\n" % (idx, len(out)) + out)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
