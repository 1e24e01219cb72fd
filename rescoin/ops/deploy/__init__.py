"""``rescoin agent deploy``: put the guest agent into guests over SSH.

For every guest (``user@host[:port]``) this module, using paramiko only:

1. connects and verifies the guest's host key against known_hosts (an unknown
   key is refused unless ``--accept-new-host-keys``, which records it; a
   changed key is always refused), then authenticates with a private key
   and/or the ssh-agent;
2. checks that it may act as root (root login, or ``sudo -n``) and that the
   guest has Python 3.6 or newer;
3. compares the SHA-256 (and mode) of every file it manages with the local
   copy and uploads, over SFTP, only what differs: the agent, its systemd unit,
   its init script, ``/etc/default/rescoin-agent`` and, for the TCP transport,
   the shared HMAC key;
4. (re)starts the agent through systemd when the guest runs it, else through
   the init script; it restarts the agent only if a file changed;
5. checks that the agent answers: over TCP a signed stats request through an
   SSH ``direct-tcpip`` channel to the guest's loopback, verified with
   :func:`rescoin.hosts.agent.parse_reply` and the shared key; over virtio-serial a
   ``rescoin_agent.py --once`` run whose JSON line must parse.

Guests are handled in parallel threads; one failing guest never stops the
others. Every remote command is a ``sh`` command line whose variable parts are
``shlex.quote``-d.
"""

from rescoin.ops.deploy.guest import HostResult
from rescoin.ops.deploy.run import deploy, deploy_host, result_table
from rescoin.ops.deploy.targets import (
    DEFAULT_AGENT_KEY,
    DEFAULT_LISTEN,
    DEFAULT_PARALLEL,
    DEFAULT_TIMEOUT,
    GLOBAL_KNOWN_HOSTS,
    REMOTE_AGENT,
    REMOTE_DEFAULTS,
    REMOTE_INIT,
    REMOTE_KEY,
    REMOTE_LOG,
    REMOTE_PIDFILE,
    REMOTE_UNIT,
    SERVICE,
    DeployError,
    HostFailure,
    RemoteFile,
    Settings,
    Target,
    agent_args,
    bundle,
    ensure_agent_key,
    load_private_key,
    parse_listen,
    parse_target,
    read_inventory,
)

__all__ = [
    "DEFAULT_AGENT_KEY", "DEFAULT_LISTEN", "DEFAULT_PARALLEL", "DEFAULT_TIMEOUT", "GLOBAL_KNOWN_HOSTS",
    "REMOTE_AGENT", "REMOTE_DEFAULTS", "REMOTE_INIT", "REMOTE_KEY", "REMOTE_LOG", "REMOTE_PIDFILE",
    "REMOTE_UNIT", "SERVICE", "DeployError", "HostFailure", "HostResult", "RemoteFile", "Settings",
    "Target", "agent_args", "bundle", "deploy", "deploy_host", "ensure_agent_key", "load_private_key",
    "parse_listen", "parse_target", "read_inventory", "result_table",
]
