"""The vLLM gateway (`e2p serve --vllm-url URL`): a running `vllm serve MODEL --enable-prompt-embeds` as the backbone
of `e2p.engines.vllm.VLLMModel`. Each row is one streamed Completions request with the whole templated prompt as
`prompt_embeds` (base64 of `torch.save`, float32 or bfloat16): vLLM 0.32's Completions API cannot mix embeddings with
token ids and its Chat Completions API takes no embedding parts, so that is the smallest exact form. The reply streams
back with its token ids (`return_token_ids`), which e2p turns into text exactly as for its other engines.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time
from collections import deque

import torch

from ..errors import ConfigError, UpstreamError
from .vllm import VLLMJob


def _b64encode(data: bytes) -> bytes:
    try:  # pybase64 (a vLLM dependency) encodes ~40x faster than the standard library: 0.06 vs 2.3 ms for 3 MB
        import pybase64

        return pybase64.b64encode(data)
    except ImportError:
        return base64.b64encode(data)


def _saved(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(x.detach().cpu().contiguous(), buf)
    return buf.getvalue()


def tensor2base64(x: torch.Tensor) -> str:
    """base64(torch.save(x)): the encoding vLLM's `prompt_embeds` expects (a contiguous CPU tensor)."""
    return _b64encode(_saved(x)).decode("ascii")


def decode_tensor(data: str) -> torch.Tensor:
    """The inverse of `tensor2base64`, loading tensors only (`weights_only=True`)."""
    return torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True)


class VLLMGateway:
    """A running `vllm serve MODEL --enable-prompt-embeds` as the engine: each row is one streamed Completions request
    with the whole prompt as `prompt_embeds`. An upstream that is down, slow or wrong becomes an `UpstreamError`
    (503, 504, 502) for that row alone; nothing waits past `timeout`."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 3.0, dtype: torch.dtype = torch.float32, max_workers: int = 64):
        import httpx

        self.url = url.rstrip("/")
        base = self.url if self.url.endswith("/v1") else self.url + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base + "/", headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                 limits=httpx.Limits(max_connections=max_workers, max_keepalive_connections=max_workers))
        self.dtype = dtype
        self.model = model or self._served_model()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="e2p-vllm-gateway")
        self.last_progress = time.monotonic()
        self.sent_bytes: deque[int] = deque(maxlen=1000)  # request body sizes, for the benchmark

    def _served_model(self) -> str:
        """The model the upstream serves (GET /v1/models), or a clear error if it cannot be reached."""
        try:
            r = self.http.get("models")
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except Exception as exc:
            raise ConfigError(f"cannot reach the vLLM server at {self.url} ({exc}): start it with `vllm serve MODEL "
                              "--enable-prompt-embeds` and pass its address to --vllm-url") from None

    @property
    def alive(self) -> bool:
        return True  # an upstream fault fails its requests (503 / 504), never the gateway

    def _fields(self, job: VLLMJob) -> dict:
        return {"model": self.model, "stream": True, "return_token_ids": True,
                **{k: v for k, v in job.sampling().items() if v is not None}}

    def body(self, job: VLLMJob) -> dict:
        """The Completions body: a row with a prefix as the whole prompt's embeddings, a plain row as token ids."""
        prompt = {"prompt": job.token_ids} if job.plain else {"prompt_embeds": tensor2base64(job.embeds.to(self.dtype))}
        return {**self._fields(job), **prompt}

    def payload(self, job: VLLMJob) -> bytes:
        """`body(job)` as JSON bytes, the megabytes of base64 spliced in as they are (base64 needs no JSON escaping;
        json.dumps of a 3 MB string alone takes ~6 ms)."""
        if job.plain:
            return json.dumps({**self._fields(job), "prompt": job.token_ids}).encode()
        head = json.dumps(self._fields(job)).encode()
        return head[:-1] + b', "prompt_embeds": "' + _b64encode(_saved(job.embeds.to(self.dtype))) + b'"}'

    def submit(self, job: VLLMJob) -> None:
        if job.prompt_logprobs:
            raise ConfigError("scoring (e2p eval) runs on the in-process engine (--engine vllm): vLLM's Completions "
                              "API gives no prompt logprobs for a prompt sent as embeddings")
        self.pool.submit(self._run, job)

    def abort(self, job: VLLMJob) -> None:
        job.cancelled = True  # its thread closes the stream at the next chunk (vLLM aborts a closed request)

    def _run(self, job: VLLMJob) -> None:
        import httpx

        try:
            payload = self.payload(job)
            self.sent_bytes.append(len(payload))
            with self.http.stream("POST", "completions", content=payload,
                                  headers={"content-type": "application/json"}) as r:
                if r.status_code >= 400:
                    r.read()
                    raise UpstreamError(502, f"vLLM at {self.url} answered {r.status_code}: {r.text[:300]}",
                                        "upstream_error")
                reason = self._read_stream(job, r)
            job.finish(reason)
        except UpstreamError as exc:
            job.fail(exc)
        except httpx.TimeoutException as exc:
            job.fail(UpstreamError(504, f"vLLM at {self.url} did not answer in time ({type(exc).__name__})",
                                   "upstream_timeout"))
        except httpx.TransportError as exc:
            job.fail(UpstreamError(503, f"vLLM at {self.url} is unreachable ({type(exc).__name__}: {exc})",
                                   "upstream_unavailable"))
        except Exception as exc:
            job.fail(UpstreamError(502, f"bad answer from vLLM at {self.url}: {exc}", "upstream_error"))

    def _read_stream(self, job: VLLMJob, r) -> str:
        reason = None
        for line in r.iter_lines():
            if job.cancelled:
                return "abort"
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise UpstreamError(502, f"vLLM at {self.url} failed mid-stream: {chunk['error'].get('message')}",
                                    "upstream_error")
            self.last_progress = time.monotonic()
            for choice in chunk.get("choices") or []:
                if job.take(choice.get("token_ids") or []):
                    return "stop"
                reason = choice.get("finish_reason") or reason
        if reason is None:
            raise UpstreamError(502, f"vLLM at {self.url} ended the stream without a finish reason", "upstream_error")
        return reason

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
