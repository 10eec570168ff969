"""The test suite. Imported before any test module or fixture, so before gRPC:"""

import os

# The tests start processes (fork + exec) from a process full of gRPC threads; gRPC core's fork handlers
# would restart its threads in each child between fork and exec (see orders/local_stack.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
