# Makes tests/peer a package, so pytest imports its conftest as `peer.conftest`: a bare `conftest` module name would
# shadow tests/conftest.py for the tests that do `from conftest import ...`.
