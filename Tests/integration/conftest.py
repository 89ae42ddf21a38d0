"""pytest options for the integration tests."""


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", default=False,
                     help="long runs: 500 SIGKILLs in the kill -9 test instead of 20 (HYDRATION_KILL9_ROUNDS overrides)")
