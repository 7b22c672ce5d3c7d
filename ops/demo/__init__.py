"""``perfusion demo``: the whole loop on this machine, as subprocesses driven through the service's HTTP API.

- :mod:`harness.processes`: start, watch and stop the worker, trainer and service subprocesses;
- :mod:`ops.demo.client`: the typed HTTP client merchants, shoppers and the order system use;
- :mod:`ops.demo.principals`: their API keys, created at the start of a run, and a client per principal;
- :mod:`ops.demo.shoppers`: simulated shoppers who judge the generated pixels with hidden tastes;
- :mod:`ops.demo.observer`: reads what the loop writes to Kafka (samples, requests, versions, production);
- :mod:`ops.demo.loop`: the rounds, their bookkeeping and what is printed.
"""
