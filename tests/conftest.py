"""Shared test setup.

tests/kernel/ holds the tests that run inside the VM of the kernel lane
(`make test-kernel`); on the host they are not collected.
"""

import os

collect_ignore = [] if os.environ.get("KUBENODE_IN_VM") == "1" else ["kernel"]
