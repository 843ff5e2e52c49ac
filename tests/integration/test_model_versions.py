"""Versions side by side (issue 26 item 4) through the real classification service (untrained-architecture
DenseNet-121 at 64 px on the CPU, max_batch_size 1) on 127.0.0.1, with two real checkpoints written from fresh
networks' state_dicts (seeds 1 and 2, so their outputs differ) and real NIH sample images:

- a second version loads beside the serving one; requests pin either (`model_version` or `name@version`),
  a version not loaded is NOT_FOUND naming the loaded ones; ListModels lists both with role, share,
  card link and parameter bytes;
- canary 20 %: of 500 unpinned requests the candidate answers 100 +- 25 (the split is a counter, so exactly
  100), counted from the responses' model version and from cxr_model_version_requests_total;
- shadow 50 %: the responses are the serving version's, unchanged; cxr_shadow_* metrics count the compared
  (and dropped) runs, one |Δp| observation per finding per compared run;
- promote then rollback under 4 concurrent workers: no request fails, and responses switch version;
- unloading a version gives its parameter bytes back (ListModels, /metrics) and frees its network;
- the segmentation service honours a pin too.
"""

from __future__ import annotations

import asyncio
import gc
import urllib.request
import weakref
from pathlib import Path

import grpc
import pytest
import torch
import torchvision
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from cxr_classification.service import build_binding
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.grpc_errors import error_info
from cxr_serving.lifecycle import checkpoint_version
from tests.support.paths import cxr14_images
from tests.support.servers import auth, make_settings, running_server

MULTI = "multiclass_classifier"
REQUESTS = 500
CANARY = 20.0
TOLERANCE = 25  # +-5 points of 500


def _checkpoint(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    torch.save(torchvision.models.densenet121(weights=None, num_classes=14).state_dict(), path)
    return checkpoint_version(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, str, str]:
    models = tmp_path_factory.mktemp("models").resolve()
    return models, _checkpoint(models / "a.pth", 1), _checkpoint(models / "b.pth", 2)


def settings(models_path: Path):
    models = {
        "binary_classifier": {"enabled": False},
        MULTI: {"architecture": "densenet121", "allow_untrained": True, "input_size": 64},
    }
    return make_settings(
        models=models,
        models_path=str(models_path),
        performance__warmup_batches=0,
        server_config__max_batch_size=1,
        server_config__max_batch_delay_ms=0,
    )


IMAGES = [p.read_bytes() for p in cxr14_images(4)]


def classify(i: int, **fields: str) -> pb.ClassifyImageRequest:
    return pb.ClassifyImageRequest(
        image=common_pb2.Image(data=IMAGES[i % len(IMAGES)], content_type="image/png"), model_names=[MULTI], **fields
    )


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def metric(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def listed(stub) -> list[common_pb2.ModelInfo]:
    """ListModels' entries of the multi-label model (the binary one is listed too, unloaded)."""
    return [m for m in (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models if m.name == MULTI]


async def two_versions(stub, models: Path) -> None:
    """Version a serves (a plain load), version b loaded beside it."""
    await stub.LoadModel(pb.LoadModelRequest(model_name=MULTI, checkpoint_path=str(models / "a.pth")), metadata=auth())
    beside = await stub.LoadModel(
        pb.LoadModelRequest(model_name=MULTI, checkpoint_path=str(models / "b.pth"), side_by_side=True),
        metadata=auth(),
        timeout=120,
    )
    assert beside.model.role == "standby"


async def test_canary_share_pins_and_listing(checkpoints) -> None:
    models, a, b = checkpoints
    s = settings(models)
    async with (
        running_server(s, build_binding(s)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = pb_grpc.ClassificationServiceStub(ch)
        await two_versions(stub, models)
        assert [(m.name, m.version, m.role) for m in await listed(stub)] == [
            (MULTI, a, "serving"),
            (MULTI, b, "standby"),
        ]
        # pins: by field and by name@version; the response names the version that answered
        for version in (a, b):
            r = await stub.ClassifyImage(classify(0, model_version=version), metadata=auth())
            assert r.predictions[0].model.version == version
            r = await stub.ClassifyImage(
                pb.ClassifyImageRequest(image=classify(0).image, model_names=[f"{MULTI}@{version}"]), metadata=auth()
            )
            assert r.predictions[0].model.version == version
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ClassifyImage(classify(0, model_version="0123456789ab"), metadata=auth())
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(rpc_status.from_call(err.value)).reason == "MODEL_VERSION_NOT_FOUND"
        assert "no version '0123456789ab' loaded" in err.value.details() and a in err.value.details()

        routed = await stub.SetModelRouting(
            pb.SetModelRoutingRequest(model_name=MULTI, candidate_version=b, canary_percent=CANARY), metadata=auth()
        )
        assert {(m.version, m.role, m.traffic_percent) for m in routed.models} == {
            (a, "serving", 100 - CANARY),
            (b, "canary", CANARY),
        }
        infos = {m.version: m for m in await listed(stub)}
        assert infos[a].model_card == f"/v1/classification/models/{MULTI}@{a}/card"
        assert infos[b].model_card == f"/v1/classification/models/{MULTI}@{b}/card"
        assert infos[a].memory_cpu_bytes == infos[b].memory_cpu_bytes > 20_000_000  # DenseNet-121: ~7M floats
        card = await stub.GetModelCard(pb.GetModelCardRequest(model_name=f"{MULTI}@{b}"), metadata=auth())
        assert card.card.version == b

        before = scrape(server)
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> str:
            async with sem:
                r = await stub.ClassifyImage(classify(i), metadata=auth(), timeout=120)
                return r.predictions[0].model.version

        versions = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        after = scrape(server)
    answered_b = versions.count(b)
    assert versions.count(a) + answered_b == REQUESTS
    assert abs(answered_b - REQUESTS * CANARY / 100) <= TOLERANCE, answered_b
    name = "cxr_model_version_requests_total"
    by_metrics = {
        (v, route): metric(after, name, model=MULTI, version=v, route=route)
        - metric(before, name, model=MULTI, version=v, route=route)
        for v in (a, b)
        for route in ("serving", "canary")
    }
    assert by_metrics == {
        (a, "serving"): REQUESTS - answered_b,
        (a, "canary"): 0,
        (b, "serving"): 0,
        (b, "canary"): answered_b,
    }


async def test_shadow_disagreement_goes_to_metrics_not_to_responses(checkpoints) -> None:
    models, a, b = checkpoints
    s = settings(models)
    n, shadow = 40, 50.0
    async with (
        running_server(s, build_binding(s)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = pb_grpc.ClassificationServiceStub(ch)
        await two_versions(stub, models)
        pinned = [await stub.ClassifyImage(classify(i, model_version=a), metadata=auth()) for i in range(len(IMAGES))]
        await stub.SetModelRouting(
            pb.SetModelRoutingRequest(model_name=MULTI, candidate_version=b, shadow_percent=shadow), metadata=auth()
        )
        before = scrape(server)
        for i in range(n):  # one at a time: the candidate's queue is never busy, so few shadow runs are dropped
            r = await stub.ClassifyImage(classify(i), metadata=auth(), timeout=60)
            assert r.predictions[0].model.version == a
            assert r.predictions[0].findings == pinned[i % len(IMAGES)].predictions[0].findings
        shadowed = n * shadow / 100
        deadline = asyncio.get_running_loop().time() + 60
        while True:  # the shadow runs finish after their responses
            after = scrape(server)
            ran = metric(after, "cxr_shadow_requests_total", model=MULTI, version=b) - metric(
                before, "cxr_shadow_requests_total", model=MULTI, version=b
            )
            dropped = metric(after, "cxr_shadow_dropped_total", model=MULTI, version=b) - metric(
                before, "cxr_shadow_dropped_total", model=MULTI, version=b
            )
            if ran + dropped >= shadowed or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
    assert ran + dropped == shadowed and ran >= shadowed / 2, (ran, dropped)
    labels = [f.label for f in pinned[0].predictions[0].findings]
    for finding in labels:
        key = {"model": MULTI, "version": b, "finding": finding}
        count = metric(after, "cxr_shadow_probability_delta_count", **key) - metric(
            before, "cxr_shadow_probability_delta_count", **key
        )
        assert count == ran, finding
        flips = metric(after, "cxr_shadow_flips_total", **key) - metric(before, "cxr_shadow_flips_total", **key)
        assert 0 <= flips <= ran
        assert ("cxr_shadow_flips_total", tuple(sorted(key.items()))) in after  # a flip rate of 0 is visible
    delta_sum = sum(
        metric(after, "cxr_shadow_probability_delta_sum", model=MULTI, version=b, finding=f)
        - metric(before, "cxr_shadow_probability_delta_sum", model=MULTI, version=b, finding=f)
        for f in labels
    )
    assert delta_sum > 0  # two different networks disagree somewhere


async def test_promote_and_rollback_under_load_fail_no_request(checkpoints) -> None:
    models, a, b = checkpoints
    s = settings(models)
    workers, per_worker = 4, 30
    async with (
        running_server(s, build_binding(s)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = pb_grpc.ClassificationServiceStub(ch)
        await two_versions(stub, models)
        answered = (await stub.ClassifyImage(classify(0), metadata=auth())).predictions[0].model
        assert answered.version == a and answered.model_card == f"/v1/classification/models/{MULTI}@{a}/card"
        failures: list[str] = []
        seen: list[str] = []

        async def worker(w: int) -> None:
            for i in range(per_worker):
                try:
                    r = await stub.ClassifyImage(classify(w + i), metadata=auth(), timeout=60)
                    seen.append(r.predictions[0].model.version)
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        async def served() -> str:
            r = await stub.ClassifyImage(classify(0), metadata=auth(), timeout=60)
            return r.predictions[0].model.version

        load = [asyncio.ensure_future(worker(w)) for w in range(workers)]
        await asyncio.sleep(0.5)
        promoted = await stub.PromoteModel(pb.PromoteModelRequest(model_name=MULTI, version=b), metadata=auth())
        assert promoted.model.version == b and promoted.model.role == "serving"
        assert await served() == b
        # a report's card link, copied from a's answer, still names a's card after b was promoted
        linked = answered.model_card.removeprefix("/v1/classification/models/").removesuffix("/card")
        card = await stub.GetModelCard(pb.GetModelCardRequest(model_name=linked), metadata=auth())
        assert card.card.version == a
        await asyncio.sleep(0.5)
        rolled = await stub.RollbackModel(pb.RollbackModelRequest(model_name=MULTI), metadata=auth())
        assert rolled.model.version == a
        assert await served() == a
        roles = {m.version: m.role for m in await listed(stub)}
        assert roles == {a: "serving", b: "previous"}  # nothing was unloaded or loaded again
        await asyncio.gather(*load)
    assert failures == []
    assert len(seen) == workers * per_worker and set(seen) == {a, b}


async def test_a_rollout_that_unloads_the_old_version_under_load_fails_no_request(checkpoints) -> None:
    """Promote b, then at once UnloadModel name@a while 8 workers keep requests queued on a: a answers
    them before it closes."""
    models, a, b = checkpoints
    s = settings(models)
    workers, per_worker = 8, 12
    async with (
        running_server(s, build_binding(s)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = pb_grpc.ClassificationServiceStub(ch)
        await two_versions(stub, models)
        failures: list[str] = []
        seen: list[str] = []

        async def worker(w: int) -> None:
            for i in range(per_worker):
                try:
                    r = await stub.ClassifyImage(classify(w + i), metadata=auth(), timeout=60)
                    seen.append(r.predictions[0].model.version)
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        load = [asyncio.ensure_future(worker(w)) for w in range(workers)]
        while len(seen) < workers:  # a serves under load
            assert not any(t.done() for t in load) or failures, failures
            await asyncio.sleep(0.02)
        await stub.PromoteModel(pb.PromoteModelRequest(model_name=MULTI, version=b), metadata=auth())
        gone = await stub.UnloadModel(pb.UnloadModelRequest(model_name=f"{MULTI}@{a}"), metadata=auth())
        assert gone.model.version == a and gone.model.state == common_pb2.MODEL_STATE_UNLOADED
        await asyncio.gather(*load)
        assert [m.version for m in await listed(stub)] == [b]
    assert failures == []
    assert len(seen) == workers * per_worker and set(seen) == {a, b}


async def test_unloading_a_version_gives_its_memory_back(checkpoints) -> None:
    models, a, b = checkpoints
    s = settings(models)
    binding = build_binding(s)
    async with running_server(s, binding) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        await two_versions(stub, models)
        network = binding.repository._versions[MULTI][b].instance._network  # the weights of version b
        expected = sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])
        densenet = torchvision.models.densenet121(weights=None, num_classes=14)
        assert expected >= sum(t.numel() * t.element_size() for t in [*densenet.parameters(), *densenet.buffers()])
        network = weakref.ref(network)
        infos = await listed(stub)
        assert [(m.version, m.memory_cpu_bytes, m.memory_gpu_bytes) for m in infos] == [
            (a, expected, 0),
            (b, expected, 0),
        ]
        assert metric(scrape(server), "cxr_model_memory_bytes", model=MULTI, version=b, device="cpu") == expected
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the serving version is not unloaded alone
            await stub.UnloadModel(pb.UnloadModelRequest(model_name=f"{MULTI}@{a}"), metadata=auth())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "serves" in err.value.details()
        gone = await stub.UnloadModel(pb.UnloadModelRequest(model_name=f"{MULTI}@{b}"), metadata=auth())
        assert gone.model.version == b and gone.model.state == common_pb2.MODEL_STATE_UNLOADED
        assert [(m.version, m.memory_cpu_bytes) for m in await listed(stub)] == [(a, expected)]
        assert ("cxr_model_memory_bytes", (("device", "cpu"), ("model", MULTI), ("version", b))) not in scrape(server)
        gc.collect()
        assert network() is None  # nothing holds version b's tensors any more
        r = await stub.ClassifyImage(classify(0), metadata=auth())
        assert r.predictions[0].model.version == a


def test_cli_validate_card_canary_promote_flow(checkpoints, tmp_path, monkeypatch, capsys) -> None:
    """README's flow through `cxr` (the CLI's main, the admin key for admin commands): load a candidate beside
    the serving version, evaluate it on labelled NIH images and record the result on its own card, give it a
    canary share, promote it, roll back, and unload it."""
    import csv
    import json

    from cxr_client.cli import main
    from tests.support.client_stack import Stack, use_stack_env
    from tests.support.paths import CXR14

    models, a, b = checkpoints
    with (CXR14 / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))[:40]
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    stack = Stack({"classification": build_binding}, models_path=str(models)).start()
    try:
        use_stack_env(stack, monkeypatch)

        def cli(*argv: str) -> str:
            capsys.readouterr()
            assert main(list(argv)) == 0, argv
            return capsys.readouterr().out

        cli("models", "load", "classification", MULTI, "--checkpoint", str(models / "a.pth"))
        out = cli("models", "load", "classification", MULTI, "--checkpoint", str(models / "b.pth"), "--side-by-side")
        assert b in out and "(standby)" in out
        cli("evaluate", str(labels), str(CXR14 / "images"), "--model", f"{MULTI}@{b}", "--out", str(tmp_path / "eval"),
            "--bootstrap", "50", "--record-card")  # fmt: skip
        report = json.loads((tmp_path / "eval" / "report.json").read_text())
        assert report["model"]["version"] == b and report["dataset"]["images"] == 40
        card = json.loads(cli("--json", "models", "card", "classification", f"{MULTI}@{b}"))
        assert card["version"] == b and card["evaluation"]["model_version"] == b
        routed = json.loads(
            cli("--json", "models", "route", "classification", MULTI, "--candidate", b, "--canary", "20")
        )
        assert {(m["version"], m["role"]) for m in routed} == {(a, "serving"), (b, "canary")}
        listed = json.loads(cli("--json", "models", "list", "--service", "classification"))
        assert {m["version"]: m["traffic_percent"] for m in listed if m["name"] == MULTI} == {a: 80, b: 20}
        # with the canary active, a plain `--model` evaluates the serving version: every request pins it (the
        # run refuses responses of two versions), so none of the 40 went to the canary
        cli("evaluate", str(labels), str(CXR14 / "images"), "--model", MULTI, "--out", str(tmp_path / "serving"),
            "--bootstrap", "20")  # fmt: skip
        report = json.loads((tmp_path / "serving" / "report.json").read_text())
        assert report["model"]["version"] == a and report["dataset"]["images"] == 40
        assert f"{b} (serving)" in cli("models", "promote", "classification", MULTI)
        assert f"{a} (serving)" in cli("models", "rollback", "classification", MULTI)
        assert "UNLOADED" in cli("models", "unload", "classification", f"{MULTI}@{b}").upper()
    finally:
        stack.stop()


async def test_segmentation_requests_pin_a_version(tmp_path) -> None:
    """The real segmentation service (U-Net/resnet18 at 64 px): a checkpoint whose head makes every pixel
    positive loads beside the untrained version; a pin picks either, and the response and its DICOM SEG
    algorithm version name the version that answered."""
    from cxr_protos.segmentation.v1 import segmentation_service_pb2 as spb
    from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as spb_grpc
    from cxr_segmentation.service import build_binding as build_segmentation
    from cxr_segmentation.service import build_model

    seg = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18"}
    s = make_settings(models__segmentation=seg, models_path=str(tmp_path.resolve()), performance__warmup_batches=0)
    net, _ = build_model(s).build(None)
    torch.nn.init.constant_(net.segmentation_head[0].bias, 5.0)
    torch.save(net.state_dict(), tmp_path / "seg.pt")
    version = checkpoint_version(tmp_path / "seg.pt")
    image = common_pb2.Image(data=IMAGES[0], content_type="image/png")
    async with (
        running_server(s, build_segmentation(s)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = spb_grpc.SegmentationServiceStub(ch)
        loaded = await stub.LoadModel(
            spb.LoadModelRequest(model_name="segmentation", checkpoint_path="seg.pt", side_by_side=True),
            metadata=auth(),
            timeout=120,
        )
        assert (loaded.model.version, loaded.model.role) == (version, "standby")
        area = {}
        for pin in ("untrained", version):
            r = await stub.SegmentImage(spb.SegmentImageRequest(image=image, model_version=pin), metadata=auth())
            assert r.model.version == pin
            area[pin] = sum(m.area_pixels for m in r.masks)
            named = await stub.SegmentImage(
                spb.SegmentImageRequest(image=image, model_name=f"segmentation@{pin}"), metadata=auth()
            )
            assert named.model.version == pin
        assert area[version] > area["untrained"]  # the checkpoint's every-pixel-positive head answered
        default = await stub.SegmentImage(spb.SegmentImageRequest(image=image), metadata=auth())
        assert default.model.version == "untrained"  # the serving version
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SegmentImage(spb.SegmentImageRequest(image=image, model_version="feedbeef0000"), metadata=auth())
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no version 'feedbeef0000'" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:  # masks cannot be compared as probabilities per finding
            await stub.SetModelRouting(
                spb.SetModelRoutingRequest(model_name="segmentation", candidate_version=version, shadow_percent=10),
                metadata=auth(),
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot shadow" in err.value.details()
