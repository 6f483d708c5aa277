# Web interface tests: a real browser. Debian's chromium, driven by
# the npm package playwright-core (no browser download). Included by the
# top-level Makefile (-include mk/*.mk); `make test` should depend on web-deps.

WEB_APT_PACKAGES := chromium fonts-dejavu-core
WEB_NODE_DIR     := tests/web

.PHONY: web-deps web-apt-deps web-node-deps test-web

web-apt-deps: ## Debian's chromium for the web UI browser test
	$(call apt_install,$(WEB_APT_PACKAGES),--no-install-recommends)

web-node-deps: $(WEB_NODE_DIR)/node_modules/.stamp ## playwright-core (npm) for the web UI browser test
$(WEB_NODE_DIR)/node_modules/.stamp: $(WEB_NODE_DIR)/package.json
	cd $(WEB_NODE_DIR) && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --silent
	@touch $@

web-deps: web-apt-deps web-node-deps ## everything the web UI tests need (chromium + playwright-core)

test-web: venv web-deps ## web interface tests only (HTTP + real browser)
	$(PY) -m pytest tests/test_web.py $(PYTEST_ARGS)
TEST_DEPS += web-deps
