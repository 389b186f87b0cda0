"""The echo servicer of the ingest benchmark: the same stubs, full deserialization, Welcome for a
Hello, one Ack per VitalsBatch, an immediate Verdict per validation record; no journal, no policy.
Run: python -m tests.benchmarks.echo_server PORT_FILE"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from tolaria.governor.v1 import common_pb2, trainer_service_pb2, trainer_service_pb2_grpc


class Echo(trainer_service_pb2_grpc.TrainerServiceServicer):
    async def Attach(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in request_iterator:
            kind = request.WhichOneof("message")
            if kind == "hello":
                yield trainer_service_pb2.AttachResponse(welcome=trainer_service_pb2.Welcome(generation=1))
            elif kind == "vitals_batch":
                batch = request.vitals_batch
                yield trainer_service_pb2.AttachResponse(
                    ack=trainer_service_pb2.Ack(up_to_seq=batch.first_seq + len(batch.step) - 1)
                )
            elif kind == "validation_record":
                record = request.validation_record
                yield trainer_service_pb2.AttachResponse(
                    verdict=trainer_service_pb2.Verdict(
                        seq=record.seq, timeline=record.timeline, step=record.step, kind=common_pb2.VERDICT_KIND_HEALTHY
                    )
                )
                yield trainer_service_pb2.AttachResponse(ack=trainer_service_pb2.Ack(up_to_seq=record.seq))


async def main(port_file: Path) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)])
    trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
