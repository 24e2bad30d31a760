"""checkov's static checks pass on deploy/, every skipped check carrying its reason in the template.

checkov lives in its own virtual environment (.tools/checkov, made by `make checkov`): installed into the
project's it would downgrade packaging and urllib3 and hold boto3 below the s3 extra's range.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.deploy import _tools

TOOL = _tools.ROOT / ".tools" / "checkov" / "bin" / "checkov"


def checkov() -> str:
    configured = os.environ.get("SCALEBUS_CHECKOV_BIN")
    for candidate in (configured, str(TOOL) if TOOL.exists() else None, shutil.which("checkov")):
        if candidate:
            return candidate
    return _tools.missing("checkov is not installed (make checkov)")


def run(directory: Path) -> dict[str, object]:
    result = subprocess.run(
        [checkov(), "-d", str(directory), "--framework", "arm", "--quiet", "--compact", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_passes_with_only_justified_skips() -> None:
    report = run(_tools.DEPLOY)
    results = report["results"]
    assert isinstance(results, dict)
    failed = [f"{c['check_id']} {c['resource']}" for c in results["failed_checks"]]
    assert not failed
    for skipped in results.get("skipped_checks", []):
        assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped["check_id"]


def test_checkov_finds_what_the_skips_hide(tmp_path: Path) -> None:
    template = _tools.template()
    for res in template["resources"]:
        res.get("metadata", {}).pop("checkov", None)
    (tmp_path / "azuredeploy.json").write_text(json.dumps(template))
    failed = {c["check_id"] for c in run(tmp_path)["results"]["failed_checks"]}  # type: ignore[index]
    assert {"CKV_AZURE_95", "CKV_AZURE_109", "CKV_AZURE_189"} <= failed
