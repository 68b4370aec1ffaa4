"""Federated zeroth-order fine-tuning: many devices, one model, only scalars on the wire
(docs/federated.md).

    server.py     the round protocol: seeds from a finite pool, replies checked, the round's
                  coefficients from them (aggregate.py), the round log persisted (log.py)
    device.py     a device: catch up on the log, probe the round's seeds (drawn as the server
                  draws them) with the run's ZO method, report its losses (or estimates) and
                  a hash of its weights
    build.py      settings -> server header, device, data partition (partition.py)
    app.py        the Flower ServerApp / ClientApp carrying those dicts (wire.py)
    deploy.py     `federate serve` / `federate join`: flower-superlink, flower-supernode, flwr run

Nothing here imports Flower except app.py and wire.py: the protocol is plain functions.
"""
