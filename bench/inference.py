"""Inference benchmark: Infer RPC throughput over loopback mTLS as a ratio to
direct in-process interpreter throughput, measured in the same run.

For a real model (mediapipe hand_landmark_full by default) it measures, in
interleaved rounds so a noisy shared machine affects all figures alike:

- direct x1: one interpreter invoked in a loop on one thread;
- direct xW: W threads with one interpreter each (W = runtime workers, one
  per core): what the hardware gives the runtime's worker pool at best;
- rpc C=1 and C=4: C concurrent clients calling Infer back to back on a
  grpc.aio server with mTLS (fleet certificates), served by a ModelRuntime
  with W workers.

The goal is rpc C=4 >= 0.7 x direct xW. By default the clients run in a
separate process, as a camera app calls its node; `--inline-clients` runs
them on the server's event loop (one process, one GIL). Either way they share
the device's cores with the server.

INT8 beside float (`--int8-models`, first one in the summary): each mediapipe
model is quantised with mesh.inference.optimize (float32 I/O, so the INT8
model keeps the float model's signature) on generated calibration inputs
(`generated_samples`: pink-noise images in the range the model's mediapipe
graph feeds it), then compared with the float model on other generated
inputs: file size, median invoke latency (one interpreter each, measured in
alternating rounds), and output error (max and mean |int8 - float| per
output, absolute and as a share of the float output's range; "within
tolerance" is what `mesh model optimize` would decide at its default).

    python bench/inference.py                          # hand_landmark_full, 5 rounds of 2 s, INT8 of 3 models
    python bench/inference.py --model pose_landmark_full --rounds 5 --window-s 4
    python bench/inference.py --part int8 --int8-models iris_landmark,face_landmark

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import numpy as np

from mesh._proto import inference_pb2 as pb
from mesh._proto import inference_pb2_grpc as pb_grpc
from mesh.identity.ca import enroll, init_fleet, load_credentials
from mesh.identity.tls import channel_credentials, secure_channel_options, server_credentials
from mesh.inference.backend import load_backend
from mesh.inference.optimize import (
    DEFAULT_TOLERANCE,
    compare_outputs,
    float32_weights,
    generated_samples,
    quantize_int8,
)
from mesh.inference.runtime import ModelRuntime, default_workers
from mesh.inference.service import add_to_server
from tests.models import mediapipe_model

GOAL_RATIO = 0.7
# Room for 4 MB+ tensors (pose_landmark_full's segmentation outputs are ~0.8 MB).
MESSAGE_LIMIT_BYTES = 16 * 1024 * 1024
# iris_landmark: float32 weights, within tolerance; hand_landmark_full: float16 weights behind
# DEQUANTIZE, faster in INT8; face_detection_short_range: float16 weights and standalone RELUs.
DEFAULT_INT8_MODELS = "iris_landmark,hand_landmark_full,face_detection_short_range"
# The input range each model's mediapipe graph feeds it (ImageToTensorCalculator's
# output_tensor_float_range): the detectors take [-1, 1], the landmark models [0, 1].
INPUT_RANGES = {"face_detection_short_range": (-1.0, 1.0), "face_detection_full_range_sparse": (-1.0, 1.0),
                "pose_detection": (-1.0, 1.0)}


def direct_throughput(backend, model_bytes: bytes, arrays, threads: int, window_s: float) -> float:
    """Invokes per second with `threads` threads, one interpreter each, for `window_s`."""
    models = [backend.load(model_bytes) for _ in range(threads)]
    for m in models:
        m.invoke(arrays)  # warm up (XNNPACK packs weights on first invoke)
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def loop(i: int) -> None:
        start.wait()
        while time.perf_counter() < stop_at[0]:
            models[i].invoke(arrays)
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + window_s
    start.wait()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - t0)


async def rpc_throughput(stub, request: pb.InferRequest, clients: int, window_s: float) -> float:
    done = [0]
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + window_s

    async def client() -> None:
        while loop.time() < stop_at:
            await stub.Infer(request, timeout=30)
            done[0] += 1

    t0 = loop.time()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done[0] / (loop.time() - t0)


async def client_process_throughput(port: int, creds_dir: Path, model: str, clients: int,
                                    window_s: float) -> float:
    """rpc_throughput measured by a child process (`--client`), so client work is not on the server's loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", str(port), str(creds_dir), "--model", model,
        "--clients", str(clients), "--window-s", str(window_s), stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"client process failed with exit code {proc.returncode}")
    return float(out.decode().strip().splitlines()[-1])


def make_request(signature) -> pb.InferRequest:
    rng = np.random.default_rng(0)
    arrays = [rng.random(s.shape).astype(s.dtype) for s in signature.inputs]
    tensors = [pb.Tensor(name=s.name, dtype=a.dtype.name, shape=list(a.shape), data=a.tobytes())
               for s, a in zip(signature.inputs, arrays, strict=True)]
    return pb.InferRequest(inputs=tensors)


async def run_client(args) -> float:
    """Child side of client_process_throughput: print calls per second."""
    port, creds_dir = args.client
    signature = load_backend().load(mediapipe_model(args.model)).signature
    request = make_request(signature)
    options = [("grpc.max_receive_message_length", MESSAGE_LIMIT_BYTES),
               ("grpc.max_send_message_length", MESSAGE_LIMIT_BYTES)]
    credentials = channel_credentials(load_credentials(Path(creds_dir)))
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                      options=secure_channel_options(peer_id="node-a") + options)
    try:
        stub = pb_grpc.InferenceStub(channel)
        await stub.Infer(request, timeout=30)  # handshake outside the window
        return await rpc_throughput(stub, request, args.clients, args.window_s)
    finally:
        await channel.close()


async def run(args) -> dict:
    backend = load_backend()
    path = mediapipe_model(args.model)
    model_bytes = path.read_bytes()
    workers = args.workers or default_workers()
    runtime = ModelRuntime(backend, workers=workers)
    signature = runtime.backend.load(model_bytes).signature
    runtime.activate(args.model, "bench", path, signature)
    request = make_request(signature)
    arrays = [np.frombuffer(t.data, dtype=t.dtype).reshape(tuple(t.shape)) for t in request.inputs]

    with tempfile.TemporaryDirectory() as tmp:
        fleet_dir = Path(tmp) / "fleet"
        init_fleet(fleet_dir, fleet_id="bench", force=True)
        server_creds = enroll(fleet_dir, "node-a", force=True)
        client_creds = load_credentials(fleet_dir / "operators" / "admin")
        options = [("grpc.max_receive_message_length", MESSAGE_LIMIT_BYTES),
                   ("grpc.max_send_message_length", MESSAGE_LIMIT_BYTES)]
        server = grpc.aio.server(options=options)
        add_to_server(server, runtime)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(server_creds))
        await server.start()
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials(client_creds),
                                          options=secure_channel_options(peer_id="node-a") + options)
        stub = pb_grpc.InferenceStub(channel)
        try:
            await stub.Infer(request, timeout=30)  # handshake and warm-up outside the windows
            figures: dict[str, list[float]] = {"direct_x1": [], f"direct_x{workers}": [], "rpc_c1": [],
                                               "rpc_c4": []}
            for _ in range(args.rounds):
                figures["direct_x1"].append(await asyncio.to_thread(
                    direct_throughput, backend, model_bytes, arrays, 1, args.window_s))
                figures[f"direct_x{workers}"].append(await asyncio.to_thread(
                    direct_throughput, backend, model_bytes, arrays, workers, args.window_s))
                for clients in (1, 4):
                    if args.inline_clients:
                        per_s = await rpc_throughput(stub, request, clients, args.window_s)
                    else:
                        per_s = await client_process_throughput(port, fleet_dir / "operators" / "admin",
                                                                args.model, clients, args.window_s)
                    figures[f"rpc_c{clients}"].append(per_s)
        finally:
            await channel.close()
            await server.stop(None)
            runtime.close()

    med = {k: statistics.median(v) for k, v in figures.items()}
    pool = f"direct_x{workers}"

    def ratio(rpc: str, direct: str) -> float:
        # Median of per-round ratios: other load on a shared machine shifts a whole round, and a
        # ratio within one round cancels most of it.
        return round(statistics.median(a / b for a, b in zip(figures[rpc], figures[direct], strict=True)), 3)

    return {
        "model": args.model, "model_bytes": len(model_bytes), "backend": f"{backend.name} {backend.version}",
        "workers": workers, "cores": os.cpu_count(), "rounds": args.rounds, "window_s": args.window_s,
        "clients": "in the server process" if args.inline_clients else "in a separate process",
        "request_bytes": request.ByteSize(),
        "per_s": {k: round(v, 1) for k, v in med.items()},
        "ratio_rpc_c1_vs_direct_x1": ratio("rpc_c1", "direct_x1"),
        "ratio_rpc_c4_vs_direct_x1": ratio("rpc_c4", "direct_x1"),
        "ratio_rpc_c1_vs_direct_pool": ratio("rpc_c1", pool),
        "ratio_rpc_c4_vs_direct_pool": ratio("rpc_c4", pool),
        "goal": f"rpc_c4 >= {GOAL_RATIO} x {pool}",
        "goal_met": ratio("rpc_c4", pool) >= GOAL_RATIO,
        "rounds_raw": {k: [round(x, 1) for x in v] for k, v in figures.items()},
    }


def median_latency_ms(model, arrays, window_s: float) -> float:
    """Median wall time of one invoke, over back-to-back invokes for `window_s`."""
    times = []
    stop_at = time.perf_counter() + window_s
    while time.perf_counter() < stop_at or len(times) < 5:
        t0 = time.perf_counter()
        model.invoke(arrays)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def int8_comparison(backend, name: str, *, calibration_samples: int, eval_samples: int, rounds: int,
                    window_s: float) -> dict:
    """One mediapipe model, float and INT8 side by side (see the module doc)."""
    float_bytes = mediapipe_model(name).read_bytes()
    reference = backend.load(float_bytes)
    value_range = INPUT_RANGES.get(name, (0.0, 1.0))
    calibration = generated_samples(reference.signature, calibration_samples, seed=1, value_range=value_range)
    held_out = generated_samples(reference.signature, eval_samples, seed=2, value_range=value_range)
    _, rewritten_ops = float32_weights(float_bytes)
    t0 = time.perf_counter()
    int8_bytes = quantize_int8(float_bytes, calibration, io_dtype="float32")
    quantize_s = time.perf_counter() - t0
    candidate = backend.load(int8_bytes)
    outputs = compare_outputs(float_bytes, int8_bytes, held_out, backend)
    arrays = held_out[0]
    reference.invoke(arrays), candidate.invoke(arrays)  # warm up (XNNPACK packs weights on first invoke)
    latency: dict[str, list[float]] = {"float": [], "int8": []}
    for _ in range(rounds):
        latency["float"].append(median_latency_ms(reference, arrays, window_s))
        latency["int8"].append(median_latency_ms(candidate, arrays, window_s))
    worst = max(outputs, key=lambda o: o.relative_error)
    return {
        "float_bytes": len(float_bytes), "int8_bytes": len(int8_bytes),
        "size_ratio": round(len(float_bytes) / len(int8_bytes), 3),
        "float_latency_ms": round(statistics.median(latency["float"]), 3),
        "int8_latency_ms": round(statistics.median(latency["int8"]), 3),
        # Median of per-round ratios, as for the RPC figures.
        "latency_ratio": round(statistics.median(i / f for f, i in zip(latency["float"], latency["int8"],
                                                                       strict=True)), 3),
        "max_relative_error": round(worst.relative_error, 4),
        "worst_output": worst.name,
        "mean_relative_error": round(max(o.mean_relative_error for o in outputs), 4),
        "within_tolerance": all(o.relative_error <= DEFAULT_TOLERANCE for o in outputs),
        "tolerance": DEFAULT_TOLERANCE,
        "ops_rewritten_before_calibration": rewritten_ops,
        "quantize_s": round(quantize_s, 2), "calibration_samples": calibration_samples,
        "eval_samples": eval_samples, "input_range": list(value_range),
        "outputs": [{"name": o.name, "max_abs_error": round(o.max_abs_error, 5),
                     "mean_abs_error": round(o.mean_abs_error, 5), "range": round(o.range, 5),
                     "max_relative_error": round(o.relative_error, 4),
                     "mean_relative_error": round(o.mean_relative_error, 4)} for o in outputs],
    }


def run_int8(args) -> dict:
    backend = load_backend()
    names = [n for n in args.int8_models.split(",") if n]
    per_model = {name: int8_comparison(backend, name, calibration_samples=args.int8_samples,
                                       eval_samples=args.int8_eval, rounds=args.rounds,
                                       window_s=min(args.window_s, 1.0)) for name in names}
    first = per_model[names[0]]
    return {"int8_model": names[0], "int8_size_ratio": first["size_ratio"],
            "int8_latency_ratio": first["latency_ratio"],
            "int8_max_relative_error": first["max_relative_error"],
            "int8_within_tolerance": first["within_tolerance"], "int8": per_model}


def print_int8(result: dict) -> None:
    print(f"INT8 (float32 I/O) against the float model, LiteRT; errors on generated held-out inputs; "
          f"tolerance {DEFAULT_TOLERANCE:.0%} of each output's range")
    print(f"  {'model':<28} {'float bytes':>11} {'int8 bytes':>10} {'size':>6} {'float ms':>8} "
          f"{'int8 ms':>8} "
          f"{'time':>6} {'max err':>8} {'mean err':>8}  verdict")
    for name, r in result["int8"].items():
        print(f"  {name:<28} {r['float_bytes']:>11,} {r['int8_bytes']:>10,} {1 / r['size_ratio']:>5.2f}x "
              f"{r['float_latency_ms']:>8.3f} {r['int8_latency_ms']:>8.3f} {r['latency_ratio']:>5.2f}x "
              f"{r['max_relative_error']:>8.1%} {r['mean_relative_error']:>8.2%}  "
              f"{'within tolerance' if r['within_tolerance'] else 'refused (' + r['worst_output'] + ')'}")
        for o in r["outputs"]:
            print(f"      {o['name']:<34} max |err| {o['max_abs_error']:<10.4g} "
                  f"mean {o['mean_abs_error']:<10.4g} "
                  f"range {o['range']:.4g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hand_landmark_full",
                        help="mediapipe model name (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="runtime workers (default: one per core)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window-s", type=float, default=2.0)
    parser.add_argument("--inline-clients", action="store_true",
                        help="run the clients on the server's event loop instead of a separate process")
    parser.add_argument("--part", choices=("all", "rpc", "int8"), default="all",
                        help="RPC throughput, INT8 against float, or both (default)")
    parser.add_argument("--int8-models", default=DEFAULT_INT8_MODELS,
                        help="mediapipe models to quantise, comma-separated (default: %(default)s)")
    parser.add_argument("--int8-samples", type=int, default=32, help="calibration inputs per model")
    parser.add_argument("--int8-eval", type=int, default=16, help="held-out inputs for the output error")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--client", nargs=2, metavar=("PORT", "CREDS_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        print(asyncio.run(run_client(args)))
        return 0
    result: dict = {}
    if args.part in ("all", "rpc"):
        result.update(asyncio.run(run(args)))
        if not args.json:
            print_rpc(result)
    if args.part in ("all", "int8"):
        result.update(run_int8(args))
        if not args.json:
            print_int8(result)
    print(json.dumps(result))
    return 0 if result.get("goal_met", True) else 1


def print_rpc(result: dict) -> None:
    print(f"{result['model']} ({result['model_bytes']} bytes, request {result['request_bytes']} bytes) on "
          f"{result['backend']}, {result['workers']} workers, {result['cores']} cores; "
          f"clients {result['clients']}; medians of {result['rounds']} rounds x {result['window_s']} s")
    for name, per_s in result["per_s"].items():
        rounds = ", ".join(f"{x:.0f}" for x in result["rounds_raw"][name])
        print(f"  {name:<12} {per_s:8.1f} /s   (rounds: {rounds})")
    print(f"  rpc c1 / direct x1   {result['ratio_rpc_c1_vs_direct_x1']:.2f}")
    print(f"  rpc c4 / direct x1   {result['ratio_rpc_c4_vs_direct_x1']:.2f}")
    print(f"  rpc c1 / direct x{result['workers']}   {result['ratio_rpc_c1_vs_direct_pool']:.2f}")
    print(f"  rpc c4 / direct x{result['workers']}   {result['ratio_rpc_c4_vs_direct_pool']:.2f}   "
          f"goal {result['goal']}: {'met' if result['goal_met'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
