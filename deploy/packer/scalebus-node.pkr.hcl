# The scalebus node image: Debian 12 (Python 3.11) with scalebus, its pinned dependencies, the systemd units
# and the analytics hook baked in, so a booting worker only writes its config (docker/cloud-init.yaml).
# The same image runs the controller VM (docker/cloud-init-controller.yaml).
#
#   make wheel                                        # dist/scalebus-<version>-py3-none-any.whl
#   packer build -var subscription_id=... -var resource_group=... -var wheel=dist/scalebus-0.1.0-py3-none-any.whl \
#     -var analytics_dir=path/to/analytics deploy/packer/scalebus-node.pkr.hcl
#
# The analytics hook: analytics_dir is copied to /opt/analytics; worker.command names a program in it
# (the template's default is /opt/analytics/bin/run-sample). Validated offline by tests/deploy/:
# `packer validate -syntax-only`, and `packer validate` with stand-in files for the variables.

variable "subscription_id" {
  type = string
}

variable "resource_group" {
  type        = string
  description = "Resource group that receives the managed image (the deployment's own, or a shared one)."
}

variable "location" {
  type    = string
  default = "westeurope"
}

variable "image_name" {
  type    = string
  default = "scalebus-node"
}

variable "image_version" {
  type    = string
  default = "0.1.0"
}

variable "vm_size" {
  type    = string
  default = "Standard_D2ds_v5"
}

variable "wheel" {
  type        = string
  description = "The scalebus wheel built by `make wheel`."
}

variable "constraints" {
  type    = string
  default = "deploy/constraints.txt"
}

variable "analytics_dir" {
  type        = string
  description = "A folder with the analytics (bin/run-sample or whatever worker.command names)."
}

source "azure-arm" "node" {
  use_azure_cli_auth                = true
  subscription_id                   = var.subscription_id
  location                          = var.location
  vm_size                           = var.vm_size
  os_type                           = "Linux"
  image_publisher                   = "Debian"
  image_offer                       = "debian-12"
  image_sku                         = "12-gen2"
  managed_image_name                = "${var.image_name}-${var.image_version}"
  managed_image_resource_group_name = var.resource_group
  azure_tags = {
    scalebus_image_version = var.image_version
  }
}

build {
  sources = ["source.azure-arm.node"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/scalebus/units /tmp/scalebus/analytics /tmp/scalebus/docs"]
  }

  provisioner "file" {
    source      = var.wheel
    destination = "/tmp/scalebus/"
  }

  provisioner "file" {
    source      = var.constraints
    destination = "/tmp/scalebus/constraints.txt"
  }

  provisioner "file" {
    sources = [
      "docker/scalebus-worker.service",
      "docker/scalebus-controller.service",
      "docker/scalebus-selfdestroy.service",
    ]
    destination = "/tmp/scalebus/units/"
  }

  provisioner "file" {
    source      = "docs/azure-quickstart.md"
    destination = "/tmp/scalebus/docs/"
  }

  provisioner "file" {
    source      = "${var.analytics_dir}/"
    destination = "/tmp/scalebus/analytics"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo -E sh -eux '{{ .Path }}'"
    inline = [
      "export DEBIAN_FRONTEND=noninteractive",
      "apt-get update",
      "apt-get install -y --no-install-recommends python3 python3-venv ca-certificates",
      "apt-get clean",
      "useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin scalebus",
      "python3 -m venv /opt/scalebus/venv",
      "/opt/scalebus/venv/bin/pip install --no-cache-dir --constraint /tmp/scalebus/constraints.txt /tmp/scalebus/scalebus-*.whl",
      "/opt/scalebus/venv/bin/scalebus --help > /dev/null",
      "install -d /opt/scalebus/share/docs /etc/scalebus /mnt/scratch",
      "install -m 0644 /tmp/scalebus/constraints.txt /tmp/scalebus/docs/azure-quickstart.md /opt/scalebus/share/docs/",
      "install -m 0644 /tmp/scalebus/units/*.service /etc/systemd/system/",
      "cp -r /tmp/scalebus/analytics /opt/analytics && chmod -R a+rX,go-w /opt/analytics",
      "systemd-analyze verify /etc/systemd/system/scalebus-*.service",
      "rm -rf /tmp/scalebus",
      # Generalize: cloud-init runs again on every VM made from the image; the agent forgets this VM.
      "cloud-init clean --logs --seed",
      "/usr/sbin/waagent -force -deprovision+user && export HISTSIZE=0 && sync",
    ]
  }
}
