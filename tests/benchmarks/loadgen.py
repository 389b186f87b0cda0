"""Load generator of the ingest benchmark (a separate process): NUM_RUNS streams sending
pre-serialized VitalsBatch messages of 256 records, as fast as the server takes them or paced to RATE
records/s in all (counting the records the server acknowledged without judging them, shed), and a probe (a process of its own, like a real trainer) measuring the validation
verdict round trip every 10 ms. Prints one JSON line.
Run: python -m tests.benchmarks.loadgen ADDRESS NUM_RUNS BATCHES [RATE]"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import queue
import resource
import statistics
import sys
import threading
import time
import uuid

import grpc

from tolaria.governor.v1 import trainer_service_pb2

RECORDS = 256
METHOD = "/tolaria.governor.v1.TrainerService/Attach"


def hello(run_id: str) -> bytes:
    return trainer_service_pb2.AttachRequest(
        hello=trainer_service_pb2.Hello(
            run_id=run_id,
            rank=0,
            world_size=1,
            incarnation_id=uuid.uuid4().hex,
            task="bench",
            num_classes=10,
        )
    ).SerializeToString()


def batches(count: int) -> list[bytes]:
    out = []
    for b in range(count):
        first = b * RECORDS + 1
        steps = list(range(first, first + RECORDS))
        out.append(
            trainer_service_pb2.AttachRequest(
                vitals_batch=trainer_service_pb2.VitalsBatch(
                    first_seq=first,
                    timeline=0,
                    step=steps,
                    loss=[1.0] * RECORDS,
                    grad_norm=[0.5] * RECORDS,
                    lr=[1e-3] * RECORDS,
                )
            ).SerializeToString()
        )
    return out


def stream(
    channel: grpc.Channel,
    messages: list[bytes],
    run_id: str,
    done: threading.Barrier,
    interval_s: float,
    shed: list[int],
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    call = channel.stream_stream(
        METHOD, request_serializer=None, response_deserializer=trainer_service_pb2.AttachResponse.FromString
    )
    welcomed = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        yield hello(run_id)
        welcomed.wait()
        done.wait()  # every stream starts sending together
        start = time.perf_counter()
        for k, message in enumerate(messages):
            if interval_s > 0:  # paced: batch k leaves at start + k x interval
                time.sleep(max(0.0, start + k * interval_s - time.perf_counter()))
            yield message

    last = len(messages) * RECORDS
    for response in call(requests(), metadata=metadata):
        kind = response.WhichOneof("message")
        if kind == "welcome":
            welcomed.set()
        elif kind == "ack":
            shed.append(response.ack.num_shed)
            if response.ack.up_to_seq >= last:
                return


def probe_process(address: str, conn: multiprocessing.connection.Connection) -> None:
    """Probe until the parent writes to ``conn``, then send the latencies back through it."""
    stop, latencies = threading.Event(), []
    thread = threading.Thread(target=probe, args=(grpc.insecure_channel(address), stop, latencies))
    thread.start()
    conn.send("ready")
    conn.recv()
    stop.set()
    thread.join()
    conn.send(latencies)


def probe(channel: grpc.Channel, stop: threading.Event, latencies: list[float]) -> None:
    call = channel.stream_stream(
        METHOD, request_serializer=None, response_deserializer=trainer_service_pb2.AttachResponse.FromString
    )
    outgoing: queue.Queue[bytes | None] = queue.Queue()
    outgoing.put(hello("probe"))

    def requests():  # type: ignore[no-untyped-def]
        while (item := outgoing.get()) is not None:
            yield item

    sent: dict[int, float] = {}
    responses = call(requests())
    next(r for r in responses if r.WhichOneof("message") == "welcome")
    seq = 0
    while not stop.is_set():
        seq += 1
        record = trainer_service_pb2.AttachRequest(
            validation_record=trainer_service_pb2.ValidationRecord(
                seq=seq, timeline=0, step=seq, epoch=seq, loss=1.0 / seq
            )
        ).SerializeToString()
        sent[seq] = time.perf_counter()
        outgoing.put(record)
        for response in responses:
            if response.WhichOneof("message") == "verdict":
                latencies.append(time.perf_counter() - sent[response.verdict.seq])
                break
        time.sleep(0.01)
    outgoing.put(None)


def main(address: str, num_runs: int, num_batches: int, rate: float = 0.0) -> None:
    messages = batches(num_batches)
    interval_s = num_runs * RECORDS / rate if rate > 0 else 0.0
    channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
    barrier = threading.Barrier(num_runs + 1)
    shed: list[int] = []  # num_shed of every Ack (list.append is atomic)
    threads = [
        threading.Thread(target=stream, args=(channels[i % 4], messages, f"bench-{i}", barrier, interval_s, shed))
        for i in range(num_runs)
    ]
    parent, child = multiprocessing.get_context("spawn").Pipe()
    prober = multiprocessing.get_context("spawn").Process(target=probe_process, args=(address, child))
    prober.start()
    parent.recv()  # the probe is attached
    time.sleep(0.5)
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    parent.send("stop")
    latencies: list[float] = parent.recv()
    prober.join()
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [0.0] * 99
    print(
        json.dumps(
            {
                "records": num_runs * num_batches * RECORDS,
                "seconds": elapsed,
                "records_per_s": num_runs * num_batches * RECORDS / elapsed,
                "records_shed": sum(shed),
                "judged_records_per_s": (num_runs * num_batches * RECORDS - sum(shed)) / elapsed,
                "offered_records_per_s": rate,
                "rtt_p50_ms": quantiles[49] * 1000,
                "rtt_p99_ms": quantiles[98] * 1000,
                "rtt_samples": len(latencies),
                "loadgen_cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
