"""The stock tritonclient's stream against decoupled Python models in `meshserve up`, read as
a client of Triton's decoupled models reads it (run in its own process by
test_decoupled.py; prints one JSON report). Every answer is recorded as
[request id, OUT or None, triton_final_response, error or None], in arrival order."""

import json
import queue
import sys
from pathlib import Path

import numpy
import tritonclient.grpc as tc
from triton_scenarios import tls_args  # beside this file, run as a script


def streamed(client: tc.InferenceServerClient, model: str, values: list[int],
             expected: int, **options) -> list:
    """`values` as requests of one IN each on one stream (ids r0, r1, ...); the first
    `expected` answers, then whatever else comes within a moment (none, when right)."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i, value in enumerate(values):
        tensor = tc.InferInput("IN", [1, 1], "INT32")
        tensor.set_data_from_numpy(numpy.array([[value]], numpy.int32))
        client.async_stream_infer(model, [tensor], request_id=f"r{i}", **options)
    got = []
    try:
        while True:
            result, error = answers.get(timeout=30 if len(got) < expected else 1.0)
            if error is not None:
                got.append([None, None, None, str(error)])
                continue
            response = result.get_response()
            flag = response.parameters.get("triton_final_response")
            out = result.as_numpy("OUT")
            got.append([response.id, None if out is None else out.reshape(-1).tolist(),
                        None if flag is None else flag.bool_param, None])
    except queue.Empty:
        pass
    client.stop_stream()
    return got


def cancelled(client: tc.InferenceServerClient, model: str) -> list:
    """One request (IN 1) on a stream that is cancelled once three answers came: their OUTs."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    tensor = tc.InferInput("IN", [1, 1], "INT32")
    tensor.set_data_from_numpy(numpy.array([[1]], numpy.int32))
    client.async_stream_infer(model, [tensor], request_id="c0")
    got = []
    for _ in range(3):
        result, error = answers.get(timeout=30)
        got.append(str(error) if error is not None else result.as_numpy("OUT").reshape(-1).tolist())
    client.stop_stream(cancel_requests=True)
    return got


def main() -> None:
    endpoint, data_dir = sys.argv[1], Path(sys.argv[2])
    client = tc.InferenceServerClient(endpoint, **tls_args(data_dir / "tls"))
    report = {
        "repeat": streamed(client, "repeat", [3, 1, 0, 2], 6),
        "repeat_empty_final": streamed(client, "repeat", [2, 0], 4,
                                       enable_empty_final_response=True),
        "inline": streamed(client, "inline", [5], 2),
        "error_answer": streamed(client, "failing", [-1], 1),
        "execute_raised": streamed(client, "failing", [99], 1),
        "cancelled": cancelled(client, "ticker"),
        "successes": {name: client.get_inference_statistics(name).model_stats[0]
                      .inference_stats.success.count for name in ("repeat", "inline")},
    }
    report["ensemble"] = streamed(client, "counting", [3, 0, 2], 5)
    report["ensemble_empty_final"] = streamed(client, "counting", [1], 2,
                                              enable_empty_final_response=True)
    report["ensemble_held"] = streamed(client, "counting_held", [3, 2], 5)
    report["ensemble_cancelled"] = cancelled(client, "ticking")
    report["ensemble_config_decoupled"] = client.get_model_config(
        "counting").config.model_transaction_policy.decoupled
    report["ensemble_successes"] = client.get_inference_statistics(
        "counting").model_stats[0].inference_stats.success.count
    report["unary"] = unary(client, "repeat")
    report["ensemble_unary"] = unary(client, "counting")
    print(json.dumps(report))


def unary(client: tc.InferenceServerClient, model: str) -> list | None:
    """A call for one answer (IN 1): its status and message, None if it was answered."""
    tensor = tc.InferInput("IN", [1, 1], "INT32")
    tensor.set_data_from_numpy(numpy.array([[1]], numpy.int32))
    try:
        client.infer(model, [tensor])
    except tc.InferenceServerException as error:
        return [error.status(), error.message()]
    return None


if __name__ == "__main__":
    main()
