"""The task kinds (tasks/base.py): one class per text (single_label.py) or a set of labels per text
(multi_label.py). Everything that differs between them is asked of the task."""
from peftlab.tasks.base import Task, for_data, for_record, get, names, of_predictions, register
from peftlab.tasks.multi_label import MULTI_LABEL
from peftlab.tasks.single_label import SINGLE_LABEL

__all__ = ["MULTI_LABEL", "SINGLE_LABEL", "Task", "for_data", "for_record", "get", "names", "of_predictions",
           "register"]
