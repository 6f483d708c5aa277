# Provisioning: ansible roles, systemd units, the testinfra suite.
#   make provision-deps                 apt packages + the ansible venv (.venv-ansible)
#   make provision HOST=thox.local [USER=root] [KEY=~/.ssh/id_ed25519.pub]
#   make verify HOST=thox.local [USER=root]
#   make test-provision                 lint, units, firewall (netns), nspawn provisioning
#   make lint-ansible                   ansible-lint (production) + --syntax-check

ANSIBLE_VENV      := $(CURDIR)/.venv-ansible
ANSIBLE_BIN       := $(ANSIBLE_VENV)/bin
PROVISION_APT     := nftables mmdebstrap systemd-container openssh-client iproute2 util-linux curl \
                     python3-venv python3-pip shellcheck rauc dbus e2fsprogs openssl
# pinned: ansible 11 (ansible-core 2.18, runs on Python 3.11 controllers)
ANSIBLE_PIP       := ansible==11.13.0 ansible-core==2.18.19 ansible-lint==26.10.1 \
                     pytest==9.2.0 pytest-testinfra==10.2.2 pyyaml
# the venv is made again when these pins change (not on other edits of this file)
ANSIBLE_STAMP     := $(ANSIBLE_VENV)/.stamp-$(word 1,$(shell echo '$(ANSIBLE_PIP)' | sha256sum | cut -c1-12))
WHEELHOUSE_DIR    ?= $(CACHE)/wheelhouse/host
# `make provision USER=admin` logs in as admin (sudo); without USER= on the command line, root
PROVISION_USER    := $(if $(filter command line,$(origin USER)),$(USER),root)
KEY               ?=
ANSIBLE_ARGS      ?=

.PHONY: provision-deps provision-apt-deps wheelhouse provision verify test-provision lint-ansible

provision-apt-deps:
	$(call apt_install,$(PROVISION_APT),--no-install-recommends)

provision-deps: provision-apt-deps $(ANSIBLE_STAMP) ## apt packages and .venv-ansible for provisioning and its tests
$(ANSIBLE_STAMP):
	@mkdir -p $(CACHE)/logs
	/usr/bin/python3 -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_BIN)/pip install -q --upgrade pip > $(CACHE)/logs/ansible-venv.log 2>&1
	$(ANSIBLE_BIN)/pip install -q $(ANSIBLE_PIP) >> $(CACHE)/logs/ansible-venv.log 2>&1 \
	  || { tail -20 $(CACHE)/logs/ansible-venv.log; exit 1; }
	@touch $@

wheelhouse: llama-wheel provision-deps ## the offline wheelhouse (app + deps) the thox_api role installs
	@PYTHON=$(ANSIBLE_BIN)/python ansible/build-wheelhouse.sh $(WHEELHOUSE_DIR) 2> $(CACHE)/logs/wheelhouse.log \
	  || { tail -20 $(CACHE)/logs/wheelhouse.log; exit 1; }

# every input is named on the command line: the wheelhouse, the host's llama-cpp-python wheel
# and the demo model's wheel (fetched and sha256-checked by demo-wheel)
provision: wheelhouse llama-wheel demo-wheel ## provision a box over ssh: make provision HOST=thox.local [USER=root] [KEY=~/.ssh/id.pub]
	@test -n "$(HOST)" || { echo "usage: make provision HOST=thox.local [USER=root] [KEY=~/.ssh/id_ed25519.pub]"; exit 2; }
	cd ansible && $(ANSIBLE_BIN)/ansible-playbook -i "$(HOST)," -u $(PROVISION_USER) site.yml \
	  -e thox_api_wheelhouse_tar=$(WHEELHOUSE_DIR)/thox-wheelhouse.tar \
	  -e thox_api_llama_wheel=$(HOST_WHEEL) -e models_demo_wheel=$(DEMO_WHEEL_DIR)/$(DEMO_WHEEL) \
	  $(if $(KEY),-e '{"ssh_authorized_keys": ["'"$$(cat $(KEY))"'"]}') $(ANSIBLE_ARGS)

verify: provision-deps ## run the testinfra suite against a box: make verify HOST=thox.local [USER=root]
	@test -n "$(HOST)" || { echo "usage: make verify HOST=thox.local [USER=root]"; exit 2; }
	$(ANSIBLE_BIN)/python -m pytest tests/infra --confcutdir=tests/infra -p no:cacheprovider \
	  --hosts=ssh://$(PROVISION_USER)@$(HOST) $(PYTEST_ARGS)

lint-ansible: provision-deps ## ansible-lint (production profile) and --syntax-check
	cd ansible && $(ANSIBLE_BIN)/ansible-lint && $(ANSIBLE_BIN)/ansible-playbook --syntax-check -i localhost, site.yml

# the test process is the app's venv (pytest-timeout, httpx, the OpenAI SDK); Ansible and
# testinfra run from .venv-ansible
test-provision: venv provision-deps llama-wheel ## the provisioning tests only (lint, units, firewall netns, nspawn)
	$(PY) -m pytest tests/provision $(PYTEST_ARGS)
TEST_DEPS += provision-deps
