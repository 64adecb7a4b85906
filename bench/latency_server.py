#!/usr/bin/env python3
"""bench/latency_server.py -- a tiny HTTP/1.1 server on loopback that timestamps, in
microseconds, when each request arrives and when its connection closes.

The bench's two latency measurements need more than the nginx mock gives: nginx logs in
whole milliseconds, and it does not notice that a client hung up on a sleeping request
(echo_sleep) until the sleep ends.  This server answers

    GET /fast...   at once: 200 {"ok":true}, keep-alive   (submit -> first request)
    GET /hold...   never; it waits for the client to close (cancel -> aborted)

and appends one line per event to the log file (the clock is time.time(), the same wall
clock PostgreSQL's clock_timestamp() reads):

    <epoch seconds, 6 decimals> request <Idempotency-Key> <path>
    <epoch seconds, 6 decimals> close   <Idempotency-Key of the connection's last request>

Usage: latency_server.py PORT LOGFILE   (binds 127.0.0.1 only; SIGTERM stops it)
"""
import asyncio
import signal
import sys
import time

BODY = b'{"ok":true}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


def main():
    port = int(sys.argv[1])
    log = open(sys.argv[2], "a", buffering=1)

    def event(what, key, extra=""):
        log.write("%.6f %s %s %s\n" % (time.time(), what, key, extra))

    async def handle(reader, writer):
        key = "-"
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1] if " " in lines[0] else "?"
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "idempotency-key":
                        key = value.strip()
                    elif name == "content-length":
                        length = int(value.strip() or 0)
                if length:
                    await reader.readexactly(length)
                event("request", key, path)
                if path.startswith("/hold"):
                    # Never answer: wait for the client to give up (EOF or reset).
                    while await reader.read(4096):
                        pass
                    break
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        event("close", key)
        writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
        async with server:
            await stop

    asyncio.run(serve())


if __name__ == "__main__":
    main()
