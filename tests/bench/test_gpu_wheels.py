"""bench/gpu/_gpu_wheels.py: which of our installed requirements a bare CUDA machine needs carried."""

from bench.gpu._gpu_wheels import needed


def names(pins: list[str]) -> set[str]:
    return {p.split("==")[0] for p in pins}


def test_walks_our_requirements_and_skips_what_the_target_has() -> None:
    got = names(needed(present={"fastapi", "grpcio"}, force=set()))
    assert {"pydantic", "litserve", "segmentation-models-pytorch", "grpcio-status"} <= got
    assert "fastapi" not in got and "grpcio" not in got  # the target has them
    # torch and NVIDIA's wheels must match the machine's CUDA: never carried, nor torch's own requirements
    assert not {n for n in got if n.startswith(("torch", "nvidia-", "cuda-"))}
    assert "sympy" not in got and "networkx" not in got
    assert not {n for n in got if n.startswith("cxr-")}  # our packages travel as source


def test_forced_packages_come_even_when_present() -> None:
    pins = needed(present={"grpcio", "protobuf"}, force={"grpcio", "protobuf"})
    assert {"grpcio", "protobuf"} <= names(pins)
    assert all("==" in p for p in pins)
