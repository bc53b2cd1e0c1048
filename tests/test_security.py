"""Security kept by the code base itself: no unpickling, no remote code, token auth never
turned off and no dashboard on every interface, in the library, the examples and the
cluster configs (the checks of a running Ray are in test_bad_input.py)."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]

SOURCES = ["raytp", "actors", "examples", "cluster"]
UNSAFE = {
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "pickle.load": re.compile(r"\b(?:cloud)?pickle\.loads?\("),
    "token authentication turned off": re.compile(r"RAY_AUTH_MODE\W+disabled"),
    "the dashboard on every interface": re.compile(r"dashboard.host\W+0\.0\.0\.0"),
}


def _files(roots):
    for root in roots:
        for path in sorted((ROOT / root).rglob("*")):
            if path.suffix in (".py", ".ipynb", ".yaml", ".yml", ".sh") and ".venv" not in path.parts:
                yield path


def _unsafe(files, allowed=()):
    return [f"{path.relative_to(ROOT)}: {what}" for path in files for what, pattern in UNSAFE.items()
            if what not in allowed and pattern.search(path.read_text(errors="replace"))]


def test_no_unpickling_remote_code_or_open_ray_in_the_code_base():
    library = list(_files(SOURCES))
    tests = [p for p in _files(["tests"]) if p.name != Path(__file__).name]
    assert len(library) > 50 and len(tests) > 20
    assert _unsafe(library) == []
    assert _unsafe(tests, allowed=("pickle.load",)) == []  # tests round-trip their own objects
    assert UNSAFE["torch.load without weights_only=True"].search("torch.load(f, map_location='cpu')")
    assert not UNSAFE["torch.load without weights_only=True"].search("torch.load(f, weights_only=True)")


def test_cluster_configs_keep_token_auth_and_the_dashboard_on_loopback():
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0]
    # every node gets the token the client has (a `ray start` in token mode needs one)
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    # KubeRay: the dashboard is behind the token (its submitter reaches it over the pod
    # network); the head, the workers and the submitter all read the token from a Secret
    spec = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())["spec"]
    job = spec["rayClusterSpec"]
    assert job["headGroupSpec"]["rayStartParams"].get("dashboard-host") in (None, "127.0.0.1")
    pods = [job["headGroupSpec"]["template"], *(g["template"] for g in job["workerGroupSpecs"]),
            spec["submitterPodTemplate"]]
    envs = [{e["name"]: e for e in c["env"]} for pod in pods for c in pod["spec"]["containers"]]
    assert len(envs) == 3
    for env in envs:
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
    submit = (ROOT / "cluster" / "submit.sh").read_text()
    assert "export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}" in submit and "no Ray token" in submit
