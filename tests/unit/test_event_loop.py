"""cxr_serving.optimize.event_loop: the loop every server process (services, gateway) runs."""

import asyncio
import builtins

import pytest
import uvloop

from cxr_serving.errors import ConfigError
from cxr_serving.optimize.event_loop import runner
from cxr_serving.settings import load_settings


def test_auto_runs_uvloop_when_installed():
    assert runner() == (uvloop.run, "uvloop")  # installed with cxr-serving
    assert runner("uvloop") == (uvloop.run, "uvloop")
    assert runner("asyncio") == (asyncio.run, "asyncio")


def test_the_runner_runs_a_coroutine_on_that_loop():
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert runner("auto")[0](which()) == "uvloop"
    assert runner("asyncio")[0](which()) == "asyncio"


def test_without_uvloop(monkeypatch):
    real_import = builtins.__import__

    def no_uvloop(name, *args, **kwargs):
        if name == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert runner("auto") == (asyncio.run, "asyncio")  # falls back quietly
    with pytest.raises(ConfigError, match="'uvloop' is not installed"):
        runner("uvloop")  # asked for by name: say so
    with pytest.raises(ConfigError, match="not 'trio'"):
        runner("trio")


def test_setting_and_env_override():
    assert load_settings(None, environ={}).server_config.event_loop == "auto"
    env = {"CXR_SERVER_CONFIG__EVENT_LOOP": "asyncio"}
    assert load_settings(None, environ=env).server_config.event_loop == "asyncio"
