"""The HTTP app in process: health, classify (all three engines), caption, metrics, every bad request,
503 + Retry-After when the queue is full, 504 past the timeout; the server keeps serving after each."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_helpers import SlowMaxProbRule, make_tiny_run, random_texts

import mmexit
from mmexit.serve.app import create_app
from mmexit.serve.service import Limits, build_service


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="module")
def client(run_dir):
    service = build_service(mmexit.load(run_dir, device="cpu"), "continuous", max_batch=8)
    with TestClient(create_app(service)) as test_client:
        yield test_client


def test_health_classify_and_metrics(client, run_dir):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() | {"queue_depth": 0} == health.json() and health.json()["engine"] == "continuous"
    assert health.json()["engines"] == ["continuous", "batch", "full"]
    assert health.json()["operating_point"] == "maxprob@0.9"
    texts = random_texts(12, seed=5)
    items = texts[:8] + [[texts[8], "good"], {"text": texts[9]}, {"text": texts[10], "text_pair": "bad"}, texts[11]]
    response = client.post("/v1/classify", json={"texts": items})
    assert response.status_code == 200, response.text
    body = response.json()
    predictor = mmexit.load(run_dir, device="cpu")  # one by one: TextPredictor.predict drops pairs mixed with singles
    expected = [predictor.predict([item])[0] for item in items]
    assert body["operating_point"] == "maxprob@0.9" and len(body["results"]) == len(items)
    for got, want in zip(body["results"], expected):
        assert (got["label"], got["label_index"], got["exit_layer"]) == (want["label"], want["label_index"],
                                                                        want["exit_layer"])
        assert max(abs(a - b) for a, b in zip(got["probabilities"], want["probabilities"])) < 1e-5
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for needed in ('mmexit_requests_total{endpoint="/v1/classify",status="200"} 1.0',
                   'mmexit_exits_total{engine="continuous",layer=', 'mmexit_queue_depth{engine="continuous"} 0.0',
                   'mmexit_queue_depth{engine="full"} 0.0',
                   'mmexit_layer_call_rows_bucket{engine="continuous",layer="1",le="8.0"}',
                   "mmexit_request_latency_seconds_bucket", 'mmexit_rows_total{engine="continuous"} 12.0'):
        assert needed in text, needed


LONG = "good " * 4001
BAD_REQUESTS = [
    (b"", 400, r"not valid JSON \(Expecting value at line 1 column 1\)"),
    (b"{", 400, r"not valid JSON"),
    (b"\xff\xfe{}", 400, r"not UTF-8 text \(byte 0\)"),
    (b"[]", 400, r'expected a JSON object \{"texts": \[...\]\}, got array'),
    (b'{"text": "good"}', 400, r'got object without "texts"'),
    (b'{"texts": "good film"}', 400, r'"texts" must be an array of texts, got string'),
    (b'{"texts": []}', 400, r'"texts" is empty'),
    (b'{"texts": [3]}', 400, r"texts\[0\]: expected a string, a \[text, text_pair\] pair or an object"),
    (b'{"texts": ["ok", ["a"]]}', 400, r"texts\[1\]: expected .* got array"),
    (b'{"texts": [null]}', 400, r"texts\[0\]: expected .* got null"),
    (b'{"texts": [{"text_pair": "a"}]}', 400, r"texts\[0\].text: expected a string, got nothing"),
    (b'{"texts": [{"text": "a", "text_pair": 4}]}', 400,
     r"texts\[0\].text_pair: expected a string or null, got number"),
    (json.dumps({"texts": [LONG]}).encode(), 413, r"texts\[0\]: 20005 characters \(at most 20000\)"),
    (json.dumps({"texts": ["a"] * 257}).encode(), 413, r"too many texts: 257 \(at most 256 per request\)"),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_a_one_line_reason(client, body, status, message):
    response = client.post("/v1/classify", content=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert "\n" not in error and set(response.json()) == {"error"}
    assert __import__("re").search(message, error), error
    assert client.post("/v1/classify", json={"texts": ["good"]}).status_code == 200  # still serving


def test_wrong_routes_and_the_other_task(client):
    assert client.get("/v1/classify").json() == {"error": "method GET not allowed on /v1/classify"}
    assert client.get("/nope").status_code == 404 and "not found: /nope" in client.get("/nope").json()["error"]
    response = client.post("/v1/caption", json={"images": []})
    assert response.status_code == 400 and "text classification model" in response.json()["error"]


@pytest.mark.parametrize("engine", ["batch", "full"])
def test_batch_and_full_engines_behind_the_same_server(client, run_dir, engine):
    texts = random_texts(6, seed=7)
    response = client.post(f"/v1/classify?engine={engine}", json={"texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    reference = mmexit.load(run_dir, rule="full" if engine == "full" else None, device="cpu").predict(texts)
    assert [r["exit_layer"] for r in body["results"]] == [r["exit_layer"] for r in reference]
    assert [r["label"] for r in body["results"]] == [r["label"] for r in reference]
    assert body["operating_point"] == ("full" if engine == "full" else "maxprob@0.9")
    assert f'mmexit_rows_total{{engine="{engine}"}} 6.0' in client.get("/metrics").text
    unknown = client.post("/v1/classify?engine=fast", json={"texts": texts})
    assert unknown.status_code == 400
    assert unknown.json() == {"error": "engine: unknown 'fast'; this server runs continuous, batch, full"}


def slow_service(run_dir, delay: float, **kw):
    predictor = mmexit.load(run_dir, device="cpu")
    predictor.rule = SlowMaxProbRule(0.99, delay)  # 3 internal exits: about 3 x delay per row
    return build_service(predictor, "continuous", max_batch=4, **kw)


def test_queue_full_is_503_with_retry_after_and_timeout_is_504(run_dir):
    service = slow_service(run_dir, 0.05, max_queue=2, limits=Limits(timeout=5.0)).start()
    app = create_app(service, manage_engine=False)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as http:
            first = asyncio.create_task(http.post("/v1/classify", json={"texts": ["good", "bad"]}))
            await asyncio.sleep(0.05)
            full = await http.post("/v1/classify", json={"texts": ["fine"]})
            return await first, full, await http.get("/metrics")

    try:
        first, full, metrics = asyncio.run(scenario())
    finally:
        service.stop()
    assert first.status_code == 200
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    assert full.json()["error"].startswith("server busy: queue full (2 rows waiting, limit 2)")
    assert 'mmexit_requests_total{endpoint="/v1/classify",status="503"} 1.0' in metrics.text

    service = slow_service(run_dir, 0.2, limits=Limits(timeout=0.15)).start()
    try:
        with TestClient(create_app(service, manage_engine=False)) as test_client:
            late = test_client.post("/v1/classify", json={"texts": ["good"]})
            assert late.status_code == 504 and late.json()["error"].startswith("no answer within 0.15 s")
            service.limits.timeout = 10.0
            assert test_client.post("/v1/classify", json={"texts": ["bad"]}).status_code == 200
    finally:
        service.stop()
    assert service.engine.depth == 0


class FakeCaptioner:
    """Stands in for a CaptionPredictor: captions each image by its size."""

    task, operating_point, run_dir = "captioning", "pcee@0.9", "fake"
    model = object()

    def caption(self, images, batch_size=16):
        return [{"caption": f"a {im.size[0]}x{im.size[1]} picture", "tokens": [5], "layers": [2]} for im in images]


def png(size=(8, 6)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_caption_endpoint_turns_photos_upright():
    """A JPEG stored 8 x 6 with EXIF orientation 6 (turn 90 degrees to display) reaches the model as 6 x 8."""
    from PIL import Image

    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 6), (10, 200, 10)).save(buffer, format="JPEG", exif=exif)
    service = build_service(FakeCaptioner(), max_batch=4)
    with TestClient(create_app(service)) as test_client:
        response = test_client.post("/v1/caption", files=[("images", ("phone.jpg", buffer.getvalue(), "image/jpeg"))])
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["caption"] == "a 6x8 picture"


def test_caption_endpoint_multipart_base64_and_bad_images():
    service = build_service(FakeCaptioner(), max_batch=4, limits=Limits(max_images=3))
    with TestClient(create_app(service)) as test_client:
        files = [("images", ("a.png", png(), "image/png")), ("images", ("b.png", png((4, 4)), "image/png"))]
        response = test_client.post("/v1/caption", files=files)
        assert response.status_code == 200, response.text
        assert [r["caption"] for r in response.json()["results"]] == ["a 8x6 picture", "a 4x4 picture"]
        encoded = base64.b64encode(png()).decode()
        response = test_client.post("/v1/caption", json={"images": [encoded, "data:image/png;base64," + encoded]})
        assert response.status_code == 200 and len(response.json()["results"]) == 2
        bad = [
            (dict(files=[("images", ("x.png", b"\x89PNG garbage", "image/png"))]), 400,
             "images[0]: cannot read the image (UnidentifiedImageError)"),
            (dict(json={"images": ["%%%"]}), 400, "images[0]: not valid base64"),
            (dict(json={"images": [3]}), 400, "images[0]: expected a base64 string, got number"),
            (dict(json={"pictures": []}), 400, 'expected a JSON object {"images": [BASE64, ...]}, got object'),
            (dict(json={"images": []}), 400, 'no images: send multipart files or {"images": [BASE64, ...]}'),
            (dict(json={"images": [encoded] * 4}), 413, "too many images: 4 (at most 3 per request)"),
            (dict(json={"texts": ["good"]}, url="/v1/classify"), 400,
             "this server runs a captioning model: POST images to /v1/caption"),
        ]
        for kwargs, status, message in bad:
            url = kwargs.pop("url", "/v1/caption")
            response = test_client.post(url, **kwargs)
            assert (response.status_code, response.json()) == (status, {"error": message})
        assert test_client.get("/health").json()["engine"] == "caption"
