"""The hooks around a call run however the call ends, on a real grpc.aio server on loopback."""

from __future__ import annotations

import asyncio

import grpc

from server.transport.rpc_hooks import final_code, wrap


def test_a_stream_hook_ends_when_the_caller_cancels_and_the_handler_clean_up_raises() -> None:
    ended: list[tuple[str, bool]] = []
    closed = asyncio.Event()

    async def endless(requests: object, context: grpc.aio.ServicerContext) -> object:
        # Suspended only at its yields: gRPC ends a cancelled call by closing the wrapper at its own yield,
        # and the wrapper then closes this generator, whose clean-up raises.
        try:
            while True:
                yield b"x"
        finally:
            closed.set()
            raise RuntimeError("the handler's clean-up failed")

    def end(context: grpc.aio.ServicerContext, state: str, ok: bool) -> None:
        ended.append((state, ok, final_code(context, ok)))

    handler = wrap(grpc.stream_stream_rpc_method_handler(endless), lambda context: "begun", end)

    async def run() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Echo", {"Stream": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream("/t.Echo/Stream")()
                assert await call.read() == b"x"
                call.cancel()
                await asyncio.wait_for(closed.wait(), 10)
                for _ in range(100):  # end runs right after the clean-up, on the server's loop
                    if ended:
                        break
                    await asyncio.sleep(0.01)
        finally:
            await server.stop(None)

    asyncio.run(run())
    assert ended == [("begun", False, "CANCELLED")]
