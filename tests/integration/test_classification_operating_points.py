"""A torchxrayvision checkpoint with operating points for some labels only (CheXpert/MIMIC style:
NaN for the NIH labels those datasets do not have), served by the real classification service
over gRPC on 127.0.0.1 and classified on the real NIH sample images.

A label without an operating point must report its raw sigmoid (never a constant 0.5), carry
CALIBRATION_NO_OPERATING_POINT with a NaN threshold, and never be positive unless the
configuration names a threshold for it; labels with an operating point behave as before.
"""

from __future__ import annotations

import base64
import json
import math

import aiohttp
import grpc
import jsonschema
import numpy as np
import pytest
import torch
import torchxrayvision as xrv

from cxr_classification.config import NIH_LABELS, XRV_TARGETS, MultiLabelClassifierConfig
from cxr_classification.preprocessing import PreprocessSpec, preprocess
from cxr_classification.service import build_binding
from cxr_client.analyze import ReportFinding, StudyReport, finding_calibration, finding_threshold
from cxr_client.report import to_html, to_markdown
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.images import decode_image
from tests.support.classifiers import nih_batch, randomize_
from tests.support.gateway_helpers import running_gateway
from tests.support.paths import cxr14_images
from tests.support.servers import TEST_KEY, auth, make_settings, running_server

MULTI = "multiclass_classifier"
# NIH labels that CheXpert (and so torchxrayvision's chex/mimic checkpoints) has no operating point for.
NO_OP = ("Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
HIGH = "Mass"  # raw sigmoid pushed above 0.5: still never positive by default
NAMED = "Hernia"  # a label without an operating point that the configuration gives a threshold
NAMED_THRESHOLD = 0.2
TOL = 1e-5
INPUT_SIZE = 64
IMAGES = 64
REFERENCE_IMAGES = 8


def chex_style_checkpoint(path) -> xrv.models.DenseNet:
    op = torch.rand(len(XRV_TARGETS), generator=torch.Generator().manual_seed(9)) * 0.3 + 0.05
    for label in NO_OP:
        op[XRV_TARGETS.index(label)] = float("nan")
    for label in ("Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"):
        op[XRV_TARGETS.index(label)] = float("nan")  # not NIH outputs; NaN in some xrv checkpoints too
    ref = randomize_(xrv.models.DenseNet(weights=None, op_threshs=op), seed=11)
    # Random weights on xrv's [-1024, 1024] inputs give logits in the thousands (probabilities of 0
    # or 1): scale the head like a trained one, logits of a few units centred per label, so that raw
    # probabilities vary with the image and some lie above 0.5.
    g = torch.Generator().manual_seed(12)
    x = nih_batch(MultiLabelClassifierConfig(checkpoint_format="xrv", input_size=INPUT_SIZE), 4)
    with torch.no_grad():
        feats = ref.features2(x).mean(0)
        ref.classifier.weight.copy_(torch.randn(ref.classifier.weight.shape, generator=g) * 5e-5)
        centre = torch.randn(len(XRV_TARGETS), generator=g) * 0.5
        centre[XRV_TARGETS.index(HIGH)] = 3.0  # raw probability ~0.95: above 0.5 on every image
        ref.classifier.bias.copy_(centre - ref.classifier.weight @ feats)
    torch.save(ref.state_dict(), path)
    return ref


def reference(ref: xrv.models.DenseNet, cfg: MultiLabelClassifierConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw sigmoid, xrv's own operating-point output) of the first `n` images, in NIH order."""
    spec = PreprocessSpec.from_config(cfg)
    x = torch.stack([preprocess(decode_image(p.read_bytes()).pixels, spec) for p in cxr14_images(n)])
    index = [XRV_TARGETS.index(label) for label in NIH_LABELS]
    with torch.no_grad():
        normed = ref(x)[:, index].numpy()
        op, ref.op_threshs = ref.op_threshs, None
        try:
            raw = torch.sigmoid(ref(x))[:, index].numpy()
        finally:
            ref.op_threshs = op
    return raw, normed


async def test_labels_without_operating_point_are_raw_flagged_and_never_positive_by_default(tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    ref = chex_style_checkpoint(models_dir / "xrv-chex.pt")
    multi = {
        "model_type": "densenet121",
        "checkpoint_format": "xrv",
        "checkpoint_path": "xrv-chex.pt",
        "input_size": INPUT_SIZE,
        "thresholds": {NAMED: NAMED_THRESHOLD},
    }
    s = make_settings(
        models_path=str(models_dir),
        models={MULTI: multi},
        performance__warmup_batches=0,
        performance__channels_last=False,  # the reference's memory format: op_norm scales by up to 1/(2*0.05)
    )
    images = cxr14_images(IMAGES)
    async with (
        running_server(s, build_binding(s)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = pb_grpc.ClassificationServiceStub(ch)
        req = pb.ClassifyImagesRequest(
            images=[common_pb2.Image(data=p.read_bytes(), content_type="image/png") for p in images]
        )
        resp = await stub.ClassifyImages(req, metadata=auth(), timeout=300)
    found: list[pb.ModelPrediction] = []
    for r in sorted(resp.results, key=lambda r: r.index):
        assert not r.HasField("error"), r.error
        (pred,) = r.predictions
        assert not pred.model.untrained
        found.append(pred)
    assert len(found) == IMAGES

    probs = np.array([[f.probability for f in p.findings] for p in found])
    by_label = {label: i for i, label in enumerate(NIH_LABELS)}
    for pred in found:
        assert [f.label for f in pred.findings] == list(NIH_LABELS)
        for f in pred.findings:
            if f.label in NO_OP:
                assert f.calibration == pb.CALIBRATION_NO_OPERATING_POINT, f
                assert f.probability != 0.5, f
                if f.label == NAMED:
                    assert f.threshold == np.float32(NAMED_THRESHOLD)
                    assert f.positive == (f.probability >= f.threshold)
                else:
                    assert math.isnan(f.threshold) and not f.positive, f
            else:
                assert f.calibration == pb.CALIBRATION_OPERATING_POINT, f
                assert f.threshold == 0.5 and f.positive == (f.probability >= 0.5), f
    # the flagged labels are image-dependent probabilities, not a constant
    for label in NO_OP:
        assert np.ptp(probs[:, by_label[label]]) > 1e-3, label
    assert (probs[:, by_label[HIGH]] > 0.5).all()  # above 0.5 everywhere, positive nowhere (checked above)

    # numbers: the raw sigmoid for labels without an operating point, xrv's own output for the others
    raw, normed = reference(ref, MultiLabelClassifierConfig.model_validate(multi), REFERENCE_IMAGES)
    no_op = [by_label[label] for label in NO_OP]
    with_op = [i for i in range(len(NIH_LABELS)) if i not in no_op]
    served = probs[:REFERENCE_IMAGES]
    np.testing.assert_allclose(served[:, no_op], raw[:, no_op], atol=TOL, rtol=0)
    np.testing.assert_allclose(served[:, with_op], normed[:, with_op], atol=TOL, rtol=0)

    # the client's report says why such a finding has no threshold
    finding = next(f for f in found[0].findings if f.label == HIGH)
    assert finding_threshold(finding) is None and finding_calibration(finding) == "no_operating_point"
    rf = ReportFinding(
        label=finding.label,
        probability=finding.probability,
        threshold=finding_threshold(finding),
        positive=finding.positive,
        model=MULTI,
        calibration=finding_calibration(finding),
    )
    report = StudyReport(study="s", generated_at="now", findings=[rf])
    md = to_markdown(report)
    assert f"| {HIGH} | {finding.probability:.3f} | none (no operating point) | no |" in md
    assert "no operating point" in to_html(report) and "nan" not in md.lower()
    assert json.loads(report.model_dump_json())["findings"][0]["threshold"] is None


async def test_rest_clients_get_a_nan_threshold_as_the_string_the_openapi_schema_admits(tmp_path):
    """Through the gateway's REST route, a label without an operating point has threshold "NaN" (proto3
    JSON's spelling of a non-finite float), and the response validates against the gateway's OpenAPI."""
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    op = torch.full((len(XRV_TARGETS),), 0.3)
    op[XRV_TARGETS.index(HIGH)] = float("nan")
    torch.save(xrv.models.DenseNet(weights=None, op_threshs=op).state_dict(), models_dir / "xrv-nan.pt")
    multi = {"model_type": "densenet121", "checkpoint_format": "xrv", "checkpoint_path": "xrv-nan.pt"}
    s = make_settings(
        models_path=str(models_dir), models={MULTI: multi | {"input_size": INPUT_SIZE}}, performance__warmup_batches=0
    )
    png = cxr14_images(1)[0].read_bytes()
    body = {"image": {"data": base64.b64encode(png).decode(), "content_type": "image/png"}, "model_names": [MULTI]}
    async with (
        running_server(s, build_binding(s)) as server,
        running_gateway({"classification": server.port}) as gw,
        aiohttp.ClientSession() as http,
    ):
        rest = f"http://127.0.0.1:{gw.ports.rest}"
        async with http.post(f"{rest}/v1/classification:classifyImage", json=body, headers={"apikey": TEST_KEY}) as r:
            assert r.status == 200, await r.text()
            payload = await r.json()
        async with http.get(f"{rest}/openapi.json") as r:
            doc = await r.json()
    (pred,) = payload["predictions"]
    finding = next(f for f in pred["findings"] if f["label"] == HIGH)
    assert finding["threshold"] == "NaN" and finding["positive"] is False
    assert finding["calibration"] == "CALIBRATION_NO_OPERATING_POINT"
    others = [f for f in pred["findings"] if f["label"] != HIGH]
    assert others and all(f["threshold"] == 0.5 for f in others)  # calibrated labels: plain JSON numbers

    schema = doc["paths"]["/v1/classification:classifyImage"]["post"]["responses"]["200"]["content"]
    response_schema = {**schema["application/json"]["schema"], "components": doc["components"]}
    jsonschema.validate(payload, response_schema)  # the whole body, the "NaN" threshold included
    finding_schema = {"$ref": "#/components/schemas/cxr.classification.v1.Finding", "components": doc["components"]}
    jsonschema.validate(finding, finding_schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema still says what a threshold is
        jsonschema.validate({**finding, "threshold": "high"}, finding_schema)
