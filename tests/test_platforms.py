"""requirements.txt on each platform: which pins each gets, by its environment markers (no network).

Linux x86_64 is the platform CI installs and tests on, so there the pins must stay exactly the ones the tests
passed with; Linux aarch64 and macOS arm64 only resolve (.ci/check_platforms checks their wheels in CI).
"""

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = ["3.11", "3.12", "3.13"]
PLATFORMS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "macos-arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
}
# What `pip install -r requirements.txt` installed on Linux x86_64 when the tests passed with it (before the
# file had markers). A copy on purpose: a change of pin changes it here too, in the same commit.
HISTORICAL = """
    absl-py==2.5.1
    aiohappyeyeballs==2.7.1
    aiohttp==3.14.5
    aiohttp-retry==2.9.1
    aiosignal==1.4.0
    alembic==1.20.1
    amqp==5.4.2
    annotated-types==0.8.0
    antlr4-python3-runtime==4.9.3
    appdirs==1.4.4
    astunparse==1.6.3
    asyncssh==2.24.1
    atpublic==9.0.0
    attrs==26.1.0
    bcrypt==5.0.0
    billiard==4.3.2
    celery==5.7.0
    certifi==2026.10.19.post1
    cffi==2.1.1
    charset-normalizer==3.5.3
    click==8.5.1
    click-didyoumean==0.3.1
    click-plugins==1.1.1.2
    click-repl==0.4.1
    cloudpickle==3.1.3
    colorama==0.4.6
    colorlog==6.12.0
    configobj==5.0.9
    contourpy==1.3.3
    cryptography==50.0.2
    cycler==0.12.1
    dictdiffer==0.10.0
    diskcache==5.6.3
    distro==1.9.0
    dpath==2.2.0
    dulwich==1.2.21
    dvc==3.67.1
    dvc-data==3.18.3
    dvc-http==2.32.0
    dvc-objects==5.2.0
    dvc-render==1.0.2
    dvc-ssh==4.3.0
    dvc-studio-client==0.23.0
    dvc-task==0.40.2
    dvclive==3.49.1
    entrypoints==0.4.2
    execnet==2.1.2
    filelock==4.3.1
    flatbuffers==25.12.19
    flatten-dict==0.5.0
    flufl.lock==9.2.0
    fonttools==4.68.0
    frozenlist==1.8.0
    fsspec==2026.9.0
    funcy==2.1
    gast==0.7.0
    gitdb==4.0.12
    GitPython==3.2.1
    google-pasta==0.2.0
    grandalf==0.8
    greenlet==3.5.6
    grpcio==1.85.3
    gto==1.10.1
    h5py==3.14.0
    hydra-core==1.3.8
    hypothesis==6.170.17
    idna==3.20
    imageio==2.38.1
    iniconfig==2.3.1
    iterative-telemetry==0.0.10
    jax==0.10.2
    jaxlib==0.10.2
    joblib==1.6.0
    keras==3.15.1
    kiwisolver==1.5.1
    kombu==5.7.0
    lazy-loader==0.6
    libclang==18.1.1
    Mako==1.4.3
    markdown-it-py==4.3.0
    MarkupSafe==3.0.4
    matplotlib==3.11.2
    mdurl==0.1.2
    ml_dtypes==0.6.0
    multidict==7.2.1
    namex==0.1.0
    narwhals==2.29.0
    networkx==3.6.1
    numpy==2.4.6
    nvidia-ml-py==13.615.71
    omegaconf==2.3.1
    onnx==1.23.2
    onnxruntime==1.32.0
    opt_einsum==3.4.0
    optree==0.20.0
    optuna==5.1.0
    orjson==3.13.0
    packaging==26.4
    pathspec==1.1.1
    pillow==13.0.0
    platformdirs==4.14.8
    playwright==1.65.2
    pluggy==1.7.0
    prompt_toolkit==3.0.53
    propcache==0.5.4
    protobuf==7.36.2
    psutil==7.2.2
    pycparser==3.12
    pydantic==2.14.4
    pydantic-settings==2.16.3
    pydantic_core==2.50.5
    pydot==4.0.1
    pygit2==1.21.0
    Pygments==2.21.0
    pygtrie==2.6.2
    pyparsing==3.3.3
    pytest==9.0.3
    pytest-xdist==3.8.0
    pytest-timeout==2.4.0
    python-dateutil==2.9.0.post0
    python-dotenv==1.2.4
    PyYAML==6.0.3
    requests==2.34.2
    rich==15.0.0
    ruamel.yaml==0.19.1
    ruff==0.17.6
    scikit-image==0.26.0
    scikit-learn==1.9.1
    scipy==1.17.1
    scmrepo==3.6.2
    semver==3.1.2
    shortuuid==1.0.13
    shtab==1.13.0
    six==1.17.0
    smmap==5.0.3
    sortedcontainers==2.4.0
    SQLAlchemy==2.1.9
    sqltrie==0.11.3
    sshfs==2026.8.0
    tabulate==0.10.0
    tensorflow-cpu==2.21.0
    termcolor==3.3.0
    tf2onnx==1.17.0
    threadpoolctl==3.8.0
    tifffile==2026.3.3
    tomlkit==0.15.2
    tqdm==4.70.1
    typing-inspection==0.4.5
    typing_extensions==4.16.0
    tzlocal==5.4.5
    urllib3==2.8.0
    vine==5.1.0
    vl-convert-python==1.9.0.post1
    voluptuous==0.16.0
    wcwidth==0.9.4
    wrapt==2.5.2
    yarl==1.25.1
    zc.lockfile==4.0
""".split()


def environment(platform: str, python: str) -> dict[str, str]:
    """Every marker variable, set for the target, so that nothing comes from the interpreter running this."""
    return {
        **PLATFORMS[platform],
        "os_name": "posix",
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_version": "",
        "extra": "",
    }


def requirements() -> list[Requirement]:
    lines = (line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def pins(platform: str, python: str) -> list[str]:
    env = environment(platform, python)
    return sorted(
        (f"{r.name}{r.specifier}" for r in requirements() if r.marker is None or r.marker.evaluate(env)),
        key=str.lower,
    )


def test_every_line_is_an_exact_pin():
    for requirement in requirements():
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1, requirement
        assert specifiers[0].operator == "==" and "*" not in specifiers[0].version, requirement
        assert not requirement.extras and not requirement.url, requirement
    names = [canonicalize_name(r.name) for r in requirements()]
    assert len(names) == len(set(names)), "a package pinned twice"


@pytest.mark.parametrize("python", PYTHONS)
def test_linux_x86_64_installs_exactly_the_pins_the_tests_passed_with(python):
    got = pins("linux-x86_64", python)
    assert got == sorted(HISTORICAL, key=str.lower)
    assert "tensorflow-cpu==2.21.0" in got
    assert not any(pin.startswith("tensorflow==") for pin in got)


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("platform", ["linux-aarch64", "macos-arm64"])
def test_aarch64_and_mac_get_tensorflow_and_every_other_pin(platform, python):
    got = pins(platform, python)
    assert "tensorflow==2.21.0" in got
    assert not any(pin.startswith("tensorflow-cpu") for pin in got)
    assert set(HISTORICAL) - {"tensorflow-cpu==2.21.0"} <= set(got)


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_one_tensorflow_build_everywhere(platform, python):
    builds = [pin for pin in pins(platform, python) if pin.split("==")[0] in ("tensorflow", "tensorflow-cpu")]
    assert len(builds) == 1, builds


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_pyproject_direct_dependencies_accept_the_pins(platform, python):
    """pyproject's dependencies and its cpu and dev extras name, on each platform, what requirements.txt pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {canonicalize_name(pin.split("==")[0]): pin.split("==")[1] for pin in pins(platform, python)}
    for extra, lines in [("", project["dependencies"])] + [
        (extra, project["optional-dependencies"][extra]) for extra in ("cpu", "dev")
    ]:
        env = {**environment(platform, python), "extra": extra}
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(env):
                continue
            name = canonicalize_name(requirement.name)
            assert name in pinned, f"{line} ({platform}, Python {python}): not in requirements.txt"
            assert requirement.specifier.contains(pinned[name]), f"{line}: requirements.txt pins {pinned[name]}"
