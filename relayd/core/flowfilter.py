"""Public face of the zero-trust flow filter: the active build (compiled or
pure) of relayd/core/_flowfilter_py.py, which holds the code and its
documentation; the verdict and protocol constants from the pure module (the
same values in both builds)."""

from relayd._build import is_compiled, load
from relayd.core import _flowfilter_py as _pure

_impl = load("flowfilter")

Rule = _impl.Rule
RuleSet = _impl.RuleSet
ConnTrack = _impl.ConnTrack
DENY, ALLOW, BLOCK, PENDING = _pure.DENY, _pure.ALLOW, _pure.BLOCK, _pure.PENDING
VERDICTS = _pure.VERDICTS
TCP, UDP, ICMP, ICMPV6 = _pure.TCP, _pure.UDP, _pure.ICMP, _pure.ICMPV6
parse_packet = _impl.parse_packet
COMPILED = is_compiled(_impl)
