"""Pod discovery: feeds that keep `PodRegistry` equal to the fleet that exists.

`pod_list` parses the `pods:` list of a config file (pure), `static` watches such a file,
`kubernetes` lists and watches pods through the Kubernetes API. Import the submodule you need;
this package imports none of them so the core can use `pod_list` without pulling in the
Kubernetes client.
"""
