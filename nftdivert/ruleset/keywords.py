"""The words nft's parser reads as keywords where a table name stands.

nft cannot quote a table name, so a table called `counter` cannot be loaded.
`render` must say so without asking libnftables (it never touches the
kernel's library), so the words are listed here: those nftables 1.0.6 reads
as keywords in `add table inet NAME`. Newer releases add words; the commands
that load libnftables anyway (check, apply, run...) also ask the installed
parser itself (kernel.check_table_name, where this list is checked too), and
tests/ruleset/test_keywords.py compares this list with the installed parser.
"""

from __future__ import annotations

RESERVED = frozenset("""
    accept add ah all and arp bridge cgroup chain comment comp constant continue counter cpu
    create ct day dccp define delete describe device devices dnat drop dst dup dynamic ecn
    element elements esp ether exists expires export exthdr fib flags flow flowtable flush frag
    fwd get goto handle hbh hook hour ibriport ibrname icmp icmpv6 igmp iif iifgroup iifname
    iiftype import include index inet insert interval ip ip6 ipsec jhash jump limit list log lt
    map mark masquerade meta meter mh missing monitor netdev nftrace not notrack numgen obriport
    obrname offload oif oifgroup oifname oiftype or osf pkttype policy position priority queue
    quota random redefine redirect reject rename replace reset return rt rt0 rt2 rtclassid rule
    ruleset sctp secmark set size skgid skuid snat socket srh symhash synproxy table tcp th time
    timeout tproxy type typeof udp udplite undefine update vlan vmap xt
""".split())

KEYWORD_REASON = "nft reads this name as a keyword; choose another"
