"""``perfusion demo``: the whole loop on this machine, as subprocesses driven through the service's HTTP API.

- :mod:`perfusion.demo.processes`: start, watch and stop the worker, trainer and service subprocesses;
- :mod:`perfusion.demo.client`: the typed HTTP client merchants and shoppers use;
- :mod:`perfusion.demo.shoppers`: simulated shoppers who judge the generated pixels with hidden tastes;
- :mod:`perfusion.demo.observer`: reads what the loop writes to Kafka (samples, requests, versions, production);
- :mod:`perfusion.demo.loop`: the rounds, their bookkeeping and what is printed.
"""
