"""Model cards through a real segmentation service (U-Net, resnet18 encoder, 64 px) with a real checkpoint
under models_path and separate inference and admin keys: the card names its file relative to models_path
and no reply carries the server's folder, a corrupt or unreadable card file is FAILED_PRECONDITION naming
the file only, and an inference key cannot record an evaluation (PERMISSION_DENIED, nothing recorded)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch

from cxr_client import AsyncCxrClient, ClientConfig
from cxr_client.errors import CxrClientError
from cxr_protos.common.v1 import common_pb2
from cxr_segmentation.service import build_binding
from tests.support.servers import make_settings, running_server

INFERENCE_KEY = "inference-key-0123456789"
ADMIN_KEY = "admin-key-0123456789abcd"
SEG = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18"}


def _config(port: int, admin_key: str) -> ClientConfig:
    return ClientConfig.model_validate(
        {
            "endpoints": {"segmentation": f"127.0.0.1:{port}"},
            "api_key": INFERENCE_KEY,
            "admin_api_key": admin_key,
            "timeout_s": 120,
        }
    )


@pytest.mark.timeout(600)
async def test_card_file_reference_corrupt_cards_and_the_inference_key(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "site").mkdir(parents=True)
    s = make_settings(
        models__segmentation=SEG,
        models_path=str(models),
        security__api_keys=[INFERENCE_KEY],
        security__admin_api_keys=[ADMIN_KEY],
        performance__warmup_batches=0,
    )
    binding = build_binding(s)
    async with running_server(s, binding) as server:
        net, _ = binding.repository.model("segmentation").build(None)  # type: ignore[attr-defined]
        torch.save(net.state_dict(), models / "site" / "seg.pt")
        card_path = models / "site" / "seg.pt.card.json"
        card_path.write_text(json.dumps({"intended_use": "research segmentation of PA radiographs"}))
        async with (
            AsyncCxrClient(_config(server.port, ADMIN_KEY)) as admin,
            AsyncCxrClient(_config(server.port, INFERENCE_KEY)) as inference,
        ):
            loaded = await admin.load_model("segmentation", "segmentation", checkpoint_path="site/seg.pt")
            card = await inference.get_model_card("segmentation", "segmentation")
            assert card.version == loaded.version and card.intended_use.startswith("research")
            assert card.source == "site/seg.pt.card.json"
            assert str(tmp_path).encode() not in card.SerializeToString()

            evaluation = common_pb2.ModelEvaluation(
                model_version=loaded.version, dataset_sha256="ab" * 32, dataset_images=5
            )
            with pytest.raises(CxrClientError) as e:  # the inference key sent as the admin key
                await inference.record_model_evaluation("segmentation", "segmentation", evaluation)
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and e.value.reason == "ADMIN_REQUIRED"
            assert "evaluation" not in json.loads(card_path.read_text())
            assert not (await inference.get_model_card("segmentation", "segmentation")).HasField("evaluation")
            recorded = await admin.record_model_evaluation("segmentation", "segmentation", evaluation)
            assert recorded.evaluation.dataset_images == 5 and recorded.source == "site/seg.pt.card.json"

            card_path.write_text('{"intended_use": "cut sh')  # corrupt
            with pytest.raises(CxrClientError) as e:
                await inference.get_model_card("segmentation", "segmentation")
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.reason == "MODEL_CARD_INVALID"
            assert "seg.pt.card.json is unreadable" in str(e.value) and str(tmp_path) not in str(e.value)

            card_path.unlink()
            card_path.mkdir()  # unreadable: the OSError's own text would carry the full path
            with pytest.raises(CxrClientError) as e:
                await inference.get_model_card("segmentation", "segmentation")
            assert e.value.reason == "MODEL_CARD_INVALID" and str(tmp_path) not in str(e.value)
            with pytest.raises(CxrClientError) as e:
                await admin.record_model_evaluation("segmentation", "segmentation", evaluation)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and str(tmp_path) not in str(e.value)
