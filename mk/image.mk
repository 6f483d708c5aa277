# The image builder (python3 -m image): `make image`, `make run-image`, `make image-demo`, `make flash`.
# Included by the top-level Makefile (-include mk/*.mk). See image/README.md.

TARGET        ?= amd64
IMAGE_PY      ?= python3
IMAGE_OUT     ?= $(CURDIR)/build
IMAGE         := $(IMAGE_OUT)/thox-amd64.img
IMAGE_APT_PACKAGES := mmdebstrap qemu-system-x86 qemu-utils ovmf mtools dosfstools gdisk fdisk e2fsprogs \
	grub-efi-amd64-bin grub-common rauc squashfs-tools openssl zstd openssh-client qemu-user-static \
	binfmt-support arch-test tar xz-utils python3-pip util-linux systemd
API_PORT      ?= 8080
SSH_PORT      ?= 2222
# the VM's overlay disk, firmware variables, throwaway ssh key, QMP socket and console log
RUNDIR        ?= $(IMAGE_OUT)/run
IMAGE_ARGS    ?=
# the version of the image and of an update bundle (IMAGE_VERSION in the slot's os-release)
VERSION       ?= $(THOX_VERSION)
# update-bundle: a directory whose files are laid over the root fs of that bundle only
OVERLAY       ?=
# the update signing keys (never committed): RAUC_CERT + RAUC_KEY sign bundles, RAUC_KEYRING
# (the CA certificate) goes into the image; unset: a throwaway test CA under $(CACHE)/rauc-test-ca.
# RELEASE=1 refuses that test CA.
export RAUC_CERT RAUC_KEY RAUC_KEYRING RELEASE

.PHONY: image-deps image-apt-deps image-wheel image update-bundle run-image image-demo flash test-image test-image-unit

image-apt-deps: ## Debian packages the image builder needs (mmdebstrap, qemu, ovmf, mtools, ...)
	$(call apt_install,$(IMAGE_APT_PACKAGES),--no-install-recommends)

# Ansible comes from the provisioning venv (.venv-ansible, mk/provision.mk): one
# pinned Ansible for live boxes and image builds alike.
image-deps: image-apt-deps provision-deps ## everything `make image` needs (apt + the ansible venv)

image-wheel: ## the portable (GGML_NATIVE=OFF) llama-cpp-python wheel for the image, cached in $(CACHE)/wheels/portable
	@mkdir -p $(CACHE)/logs
	@$(IMAGE_PY) -m image wheel

image: image-deps ## build the image: TARGET=amd64 (build/thox-amd64.img) or TARGET=jetson-orin (flash package)
	ANSIBLE_PLAYBOOK=$(ANSIBLE_BIN)/ansible-playbook $(IMAGE_PY) -m image build --target $(TARGET) --out $(IMAGE_OUT) \
	  --version $(VERSION) $(IMAGE_ARGS)

update-bundle: image-deps ## signed RAUC bundle build/thox-amd64-$(VERSION).raucb of the image's root fs [VERSION=v OVERLAY=dir]
	ANSIBLE_PLAYBOOK=$(ANSIBLE_BIN)/ansible-playbook $(IMAGE_PY) -m image bundle --version $(VERSION) --out $(IMAGE_OUT) \
	  $(if $(OVERLAY),--overlay $(OVERLAY))

# QEMU runs in its own session; whatever ends the command (Ctrl-C, SIGTERM, SIGHUP when the
# terminal closes, make or `python3 -m image run` killed) powers the VM off (image/qemu.py)
run-image: image-apt-deps ## boot build/thox-amd64.img in QEMU (TCG, UEFI); 127.0.0.1:8080->8080, :2222->22 [DISK=file: keep that disk]
	@test -f $(IMAGE) || $(MAKE) image
	$(IMAGE_PY) -m image run --image $(IMAGE) --rundir $(RUNDIR) --api-port $(API_PORT) --ssh-port $(SSH_PORT) \
	  $(if $(DISK),--disk $(DISK))

image-demo: image ## build the image with the demo model, boot it, print base URL + API key; Ctrl-C stops
	$(IMAGE_PY) -m image demo --image $(IMAGE) --rundir $(RUNDIR) --api-port $(API_PORT) --ssh-port $(SSH_PORT)

flash: ## Jetson: flash the package made by `make image TARGET=jetson-orin` (board in recovery mode, USB)
	$(IMAGE_PY) -m image flash --out $(IMAGE_OUT) $(IMAGE_ARGS)

test-image-unit: venv ## image builder unit tests (Jetson composition, pins, secret scan; seconds)
	$(PY) -m pytest tests/image -m "not image" $(PYTEST_ARGS)

test-image: venv image-deps ## end-to-end: build, boot in QEMU, testinfra + OpenAI SDK smoke (minutes)
	$(PY) -m pytest tests/image -m image $(PYTEST_ARGS)
TEST_DEPS += image-deps
