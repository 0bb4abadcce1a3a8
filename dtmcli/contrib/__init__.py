"""Optional web-framework integrations: ``dtmcli.contrib.flask``, ``.fastapi``, ``.starlette`` and ``.django``.

Each imports its framework only when imported itself. All of them parse the branch call into a
:class:`~dtmcli.branch.BranchInfo`, pass it to the handler as the keyword argument ``info``, and
answer through the framework-neutral mapping of :mod:`dtmcli.branch`. Handlers may be plain
``def`` or ``async def`` (FastAPI/Starlette and Django under ASGI run the latter on their event
loop; Flask runs each in a loop of its own); :func:`dtmcli.branch.current_branch_info` is the call
being served in either.
"""
