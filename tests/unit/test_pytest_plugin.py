"""The dtmcli pytest plugin is opt-in and coexists with a project's own ``--dtm-server`` (issue 9.16).

Each case runs a small user project with pytester in a subprocess, so the installed package's
entry points are loaded exactly as in a user's service.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

OWN_OPTION = """
def pytest_addoption(parser):
    parser.addoption("--dtm-server", action="store_true", help="the project's own flag")
"""

OPT_IN = 'pytest_plugins = ["dtmcli.testing.pytest_plugin"]\n'


@pytest.fixture(autouse=True)
def no_env_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DTM_SERVER", raising=False)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)


def test_installing_the_sdk_adds_nothing_to_a_project(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(OWN_OPTION)
    pytester.makepyfile(
        """
        def test_own_flag(request):
            assert request.config.getoption("--dtm-server") is True

        def test_no_dtm_fixture(request):
            import pytest
            with pytest.raises(pytest.FixtureLookupError):
                request.getfixturevalue("dtm")
        """
    )
    result = pytester.runpytest_subprocess("--dtm-server",)
    result.assert_outcomes(passed=2)


def test_opted_in_next_to_the_projects_own_option(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(OPT_IN + OWN_OPTION)
    pytester.makepyfile(
        """
        def test_own_flag_and_in_process_dtm(request, dtm):
            assert request.config.getoption("--dtm-server") is True
            assert not dtm.is_real and dtm.url.startswith("http://127.0.0.1:")
        """
    )
    result = pytester.runpytest_subprocess("--dtm-server",)
    result.assert_outcomes(passed=1)


def test_opted_in_project_option_leaves_dtm_server_env_working(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DTM_SERVER", "http://127.0.0.1:1/api/dtmsvr/")
    pytester.makeconftest(OPT_IN + OWN_OPTION)
    pytester.makepyfile(
        """
        def test_real(dtm):
            assert dtm.is_real and dtm.url == "http://127.0.0.1:1/api/dtmsvr"
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


@pytest.mark.parametrize("how", ["conftest", "-p"])
def test_project_option_wins_however_the_plugin_is_loaded(pytester: pytest.Pytester, how: str) -> None:
    # With -p, pytest registers the plugin before the project's conftest adds its own --dtm-server.
    pytester.makeconftest((OPT_IN if how == "conftest" else "") + OWN_OPTION)
    pytester.makepyfile(
        """
        def test_own_flag_and_in_process_dtm(request, dtm):
            assert request.config.getoption("--dtm-server") is True
            assert not dtm.is_real
        """
    )
    args = ["-p", "dtmcli.testing.pytest_plugin"] if how == "-p" else []
    pytester.runpytest_subprocess("--dtm-server", *args).assert_outcomes(passed=1)


@pytest.mark.parametrize("how", ["conftest", "-p"])
def test_opted_in_plugin_options_and_fixtures(pytester: pytest.Pytester, how: str) -> None:
    args: list[str] = []
    if how == "conftest":
        pytester.makeconftest(OPT_IN)
    else:
        args += ["-p", "dtmcli.testing.pytest_plugin"]
    pytester.makepyfile(
        """
        def test_real(dtm, branch_service, dtm_server):
            assert dtm.is_real and dtm.url == "http://127.0.0.1:1/api/dtmsvr"
            assert branch_service.base_url and dtm_server.url
        """
    )
    pytester.runpytest_subprocess("--dtm-server", "http://127.0.0.1:1/api/dtmsvr", *args).assert_outcomes(passed=1)
