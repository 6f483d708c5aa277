# Fuzz, load and benchmark dependencies (`make test-fuzz`, `make test-load`, `make bench`).
# Included by the top-level Makefile (-include mk/*.mk).
#
#   fuzz-deps   hypothesis + schemathesis into .venv (tests/test_fuzz.py;
#               `make test` should depend on it)
#   bench-deps  the deps of llama-cpp-python's [server] extra, by name, so the
#               benchmark can start `python -m llama_cpp.server` (`make bench`
#               should depend on it). llama-cpp-python itself is not touched:
#               it stays the cached host wheel.
#   llama-server  llama.cpp's C++ llama-server, built once from the llama.cpp
#               source vendored in the llama-cpp-python $(LLAMA_CPP_PYTHON_VERSION) sdist (the
#               same llama.cpp version as our engine), cached in
#               $(CACHE)/llama-server-$(LLAMA_CPP_PYTHON_VERSION)/bin (about 7 minutes on 2 cores,
#               once; log $(CACHE)/logs/llama-server-build.log). `make bench`
#               depends on it through bench-deps, `make test` directly (the bench
#               harness test checks the bench's flags against it).
#   test-fuzz, test-load   run just those tests

FUZZ_PIP_PACKAGES  := 'hypothesis>=6.100' 'schemathesis>=4.0,<5'
BENCH_PIP_PACKAGES := 'uvicorn>=0.22.0' 'fastapi>=0.100.0' 'pydantic-settings>=2.0.1' \
                      'sse-starlette>=1.6.1' 'starlette-context>=0.3.6,<0.4' 'PyYAML>=5.1'

.PHONY: fuzz-deps bench-deps llama-server test-fuzz test-load

fuzz-deps: $(VENV)/.fuzz-deps ## hypothesis + schemathesis in .venv (fuzz tests)
$(VENV)/.fuzz-deps: mk/bench.mk | venv
	$(PY) -m pip install -q --find-links $(HOST_WHEELS) $(FUZZ_PIP_PACKAGES)
	@touch $@

bench-deps: $(VENV)/.bench-deps ## llama-cpp-python server extras' deps in .venv (bench)
$(VENV)/.bench-deps: mk/bench.mk | venv
	$(PY) -m pip install -q --find-links $(HOST_WHEELS) $(BENCH_PIP_PACKAGES)
	@$(PY) -c "import llama_cpp.server.app" || { echo "llama_cpp.server does not import"; exit 1; }
	@touch $@

# the script checks its own stamp (source version + cmake flags): a no-op once built
# (cmake and build-essential come from apt-deps in the Makefile; pip only to fetch the sdist once)
llama-server: | apt-deps-once ## build llama.cpp's C++ llama-server for the bench once (cached in /var/cache/thox-build)
	@CACHE=$(CACHE) LLAMA_VERSION=$(LLAMA_CPP_PYTHON_VERSION) PIP="$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m pip" \
	  tests/bench/build_llama_server.sh
bench-deps: llama-server

test-fuzz: venv fuzz-deps ## fuzz every route (schemathesis + hypothesis, ~5,500 requests)
	$(PY) -m pytest tests/test_fuzz.py $(PYTEST_ARGS)

test-load: venv ## overload, Retry-After, 100 disconnects, memory back to baseline
	$(PY) -m pytest tests/test_load.py $(PYTEST_ARGS)
TEST_DEPS += fuzz-deps llama-server
