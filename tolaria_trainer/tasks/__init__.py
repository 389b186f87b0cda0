"""The task registry: each TaskSpec gives data, model, loss and hence the random-guess loss."""

from tolaria_trainer.errors import TaskError
from tolaria_trainer.tasks.builtin import TASKS
from tolaria_trainer.tasks.factory import create_model
from tolaria_trainer.tasks.spec import TaskData, TaskSpec


def get_task(name: str) -> TaskSpec:
    """The task named ``name``; raises TaskError listing the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "TaskData", "TaskSpec", "create_model", "get_task"]
