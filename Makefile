# The newcomer's commands: `make demo` (a registration and a call through real IPsec) and
# `make test` (every test). Both install what they need first (`make install`).
SYSPY  := /usr/bin/python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -p no:cacheprovider --color=no
STAMP  := .stamp

.PHONY: install test unit kernel bench demo load soak run fuzz clean

install: $(STAMP)/apt $(STAMP)/venv kamailio.paths.cfg

# Where kamailio.cfg finds this checkout's KEMI script (app_python3 needs an absolute path);
# rewritten whenever the checkout has moved. `-A 'KEMI_SCRIPT="/abs/script.py"'` overrides it
# (a script of the operator's own that imports kemi.pcscf; tools/profile_kemi.py does).
PATHS_TEXT := \#!ifndef KEMI_SCRIPT\n\#!define KEMI_SCRIPT "$(CURDIR)/kemi/pcscf.py"\n\#!endif\n
kamailio.paths.cfg: FORCE
	@printf '$(PATHS_TEXT)' > $@.new && if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi
FORCE:

$(STAMP)/apt: tools/install-deps
	tools/install-deps
	@mkdir -p $(STAMP) && touch $@

$(STAMP)/venv: pyproject.toml $(STAMP)/apt
	$(SYSPY) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@mkdir -p $(STAMP) && touch $@

# Unit tests on the host, then the real-kernel and Kamailio tests in one kernel with ESP
# (User-mode Linux when this host's kernel has none).
test: install unit kernel

unit: install
	$(PYTEST) -q tests/unit

# Real-kernel tests and the end-to-end P-CSCF scenarios, in one boot.
kernel: install
	tools/with-esp $(PYTEST) -q tests/kernel tests/e2e

bench: install
	$(PY) -m tools.bench_store
	tools/with-esp $(PY) -m tools.bench_kernel

# A registration and a call through real IPsec, narrated (User-mode Linux when needed).
demo: install
	tools/with-esp $(PY) -m tools.demo

# N phones through the P-CSCF with real ESP, then through a plain relay (tools/load), e.g.
# make load N=200 K=20 [KEEP=/abs/dir] [LOAD_ARGS='--children 4 --max-connections 20'].
# Options travel into User-mode Linux in LOAD_ARGS; KEEP is made here so the guest can write it.
N ?= 1000
K ?= 20
load: install
	$(if $(KEEP),mkdir -p $(abspath $(KEEP)))
	LOAD_ARGS="--phones $(N) --in-flight $(K)$(if $(KEEP), --keep $(abspath $(KEEP))) $(LOAD_ARGS)" \
	  tools/with-esp $(PY) -m tools.load

# CYCLES register / re-key / MO+MT / de-register-or-expire cycles over SOAK_N phones through
# the P-CSCF with real ESP (tools/soak), then 0 leaks and flat memory, e.g.
# make soak [SOAK_N=200 CYCLES=10000] [SOAK_ARGS='--expire-every 5 --short-expires 5 --grace 2'].
SOAK_N ?= 200
CYCLES ?= 10000
soak: install
	$(if $(KEEP),mkdir -p $(abspath $(KEEP)))
	SOAK_ARGS="--phones $(SOAK_N) --cycles $(CYCLES)$(if $(KEEP), --keep $(abspath $(KEEP))) $(SOAK_ARGS)" \
	  tools/with-esp $(PY) -m tools.soak

# The P-CSCF on this host, in the foreground, for real deployments: defines as make
# variables or in the environment, e.g. make run PCSCF_IP=10.0.0.1 NEXT_HOP='"sip:10.0.0.2"'
RUN_DEFINES := PCSCF_IP PCSCF_IP6 NEXT_HOP IPSEC_LISTEN_ADDR IPSEC_LISTEN_ADDR6 IPSEC_CLIENT_PORT \
  IPSEC_SERVER_PORT IPSEC_MAX_CONNECTIONS IPSEC_SPI_ID_START IPSEC_SPI_ID_RANGE \
  IPSEC_PREFERRED_ALG IPSEC_PREFERRED_EALG IPSEC_REUSE_SERVER_PORT IPSEC_LISTEN_NAME \
  IPSEC_LISTEN_AGNAME IPSEC_STORE RUN_DIR EXPIRY_GRACE CHILDREN IPSEC_CHILDREN CORE_IP CORE_PORT
export $(RUN_DEFINES)
run: install
	tools/run-pcscf

# 200,000 headers at the sec-agree parsers, then 1,000,000 whole messages through the routing
# (tests/fuzz_sip.py; FUZZ_ARGS='--count N --seed S --jobs J' to change it).
fuzz: install
	$(PY) -m tests.fuzz_secagree
	$(PY) -m tests.fuzz_sip $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) $(STAMP) *.egg-info
