"""Copy docker/cloud-init.yaml and docker/cloud-init-controller.yaml into deploy/azuredeploy.json.

An ARM template cannot read a file, so the template carries each cloud-init as a string variable
(``workerCloudInit``, ``controllerCloudInit``) and fills its ``@@NAME@@`` placeholders with replace().
tests/deploy/ fails when the copies differ from the files; run this after editing either file:
    python3 deploy/embed_cloud_init.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "azuredeploy.json"
EMBEDDED = {
    "workerCloudInit": ROOT / "docker" / "cloud-init.yaml",
    "controllerCloudInit": ROOT / "docker" / "cloud-init-controller.yaml",
}


def main() -> None:
    template = json.loads(TEMPLATE.read_text())
    for variable, source in EMBEDDED.items():
        template["variables"][variable] = source.read_text()
    TEMPLATE.write_text(json.dumps(template, indent=2) + "\n")


if __name__ == "__main__":
    main()
