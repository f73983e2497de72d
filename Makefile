# The two commands: `make up` (start everything locally) and `make test` (all tests).
CARGO ?= cargo
# CI builds once from a clean clone: incremental state would only take disk
ifdef CI
export CARGO_INCREMENTAL := 0
endif
DEV := target/dev
SHARD ?= 0

.PHONY: up down shard-stop shard-start test bench deps build fuzz soak

deps:
	@bash scripts/setup.sh

build:
	$(CARGO) build --workspace --bins

# make up: an optimized build (profile `serve`), so a first look is not a debug build
up: deps
	$(CARGO) build --profile serve --workspace --bins
	@SHARDGATE_PROFILE=serve ./target/serve/devcluster --dir $(DEV) --tls up
	@echo
	@echo "-- a query through shardgate:"
	@psql "$$(jq -r .proxy_dsn $(DEV)/cluster.json)" -c 'select version()' -c "select 'shardgate is serving' as status" -c '\conninfo'

down:
	@d=$$(ls -t target/serve/devcluster target/debug/devcluster 2>/dev/null | head -1); if [ -n "$$d" ]; then $$d --dir $(DEV) down; else echo "nothing to stop"; fi

shard-stop:
	@$$(ls -t target/serve/devcluster target/debug/devcluster 2>/dev/null | head -1) --dir $(DEV) shard-stop $(SHARD)

shard-start:
	@$$(ls -t target/serve/devcluster target/debug/devcluster 2>/dev/null | head -1) --dir $(DEV) shard-start $(SHARD)

test: deps build
	$(CARGO) test --workspace --no-fail-fast

bench: deps
	$(CARGO) build --release --workspace --bins
	@bash scripts/bench.sh
	@bash scripts/bench_routed.sh
	@bash scripts/bench_lookup.sh
	@bash scripts/bench_sync.sh
	@bash scripts/bench_cache.sh
	@bash scripts/bench_migrate.sh

fuzz:
	@bash scripts/fuzz.sh $(or $(SECONDS_TO_RUN),600) $(or $(FUZZ_TARGET),frames)

# the random differential test (tests/tests/random_differential.rs) over random seeds until SECONDS (default 600) are up
soak: build
	SHARDGATE_SOAK_SECONDS=$(or $(SECONDS),600) $(CARGO) test -p shardgate-tests --test random_differential -- --nocapture
