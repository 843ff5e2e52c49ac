from __future__ import annotations

import pytest

from tests.support.chart import EXAMPLES, Rendered, load_values, render


@pytest.fixture(scope="session")
def default_values() -> dict:
    return {}


@pytest.fixture(scope="session")
def dev_values() -> dict:
    return load_values(EXAMPLES / "values-dev-cpu.yaml")


@pytest.fixture(scope="session")
def prod_values() -> dict:
    return load_values(EXAMPLES / "values-production.yaml")


@pytest.fixture(scope="session")
def default_render() -> Rendered:
    return render()


@pytest.fixture(scope="session")
def dev_render(dev_values: dict) -> Rendered:
    return render(dev_values)


@pytest.fixture(scope="session")
def prod_render(prod_values: dict) -> Rendered:
    return render(prod_values)


@pytest.fixture(scope="session", params=["default", "dev-cpu", "production"])
def any_render(request: pytest.FixtureRequest, default_render: Rendered, dev_render: Rendered, prod_render: Rendered):
    return {"default": default_render, "dev-cpu": dev_render, "production": prod_render}[request.param]
