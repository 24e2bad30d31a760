"""``scalebus image bake``: capture a prepared VM into an Azure Compute Gallery image version.

The seed's image path as one pipeline step: a VM booted from a base image and provisioned (Packer, or by hand;
deprovisioned with ``waagent -deprovision+user`` last) is deallocated, generalized and captured as a version of
a gallery image definition. The image version id is printed (``-o json``: ``image_version_id``), so the next
step (``scalebus rollout --image``) chains on it. ARM is reached at ``scale_set.arm_endpoint`` with
``DefaultAzureCredential`` (a pipeline's workload identity; the role it needs is
``docker/roles/scalebus-pipeline.json``). The VM is left generalized and deallocated: it cannot boot again,
delete it once the version exists.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Annotated

import typer

from scalebus.cli import output as out
from scalebus.cli import wiring
from scalebus.cli.options import ConfigOpt, LogFormatOpt, OutputOpt
from scalebus.cli.output import Output


def bake_cmd(
    vm: Annotated[str, typer.Option("--vm", help="The prepared VM's resource id.", show_default=False)],
    gallery_image: Annotated[
        str,
        typer.Option("--gallery-image", help="The gallery image definition's resource id.", show_default=False),
    ],
    version: Annotated[
        str, typer.Option("--version", help="The new image version, MAJOR.MINOR.PATCH.", show_default=False)
    ],
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Deallocate and generalize a prepared VM, then capture it as a gallery image version.

    Prints the image version id (-o json for pipelines). Running it again for a version this VM already made
    prints that version; a version of the same name from another source is refused.
    """
    cfg = wiring.load_settings(config, log_format)
    with contextlib.ExitStack() as stack:
        baker = wiring.open_image_baker(cfg, vm_id=vm)
        stack.callback(baker.close)
        baked = baker.bake(vm_id=vm, image_definition_id=gallery_image, version=version)
    out.emit(asdict(baked), output, lambda d: out.kv_table("image version", d))
