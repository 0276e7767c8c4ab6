@echo off
rem hyper2kvm first-boot runner: scheduled task @TASK@, as SYSTEM, in the background.
rem Runs each step listed in steps.txt until it exits 0, at most @MAX_TRIES@ tries per step
rem over all boots (the count in state\<step>.tries is raised BEFORE each try, so a step
rem that hangs or restarts the machine is bounded too). Each try runs under
rem h2k-watchdog.ps1: past the step's time limit its whole process tree is killed.
rem A step is marked done only when it exits 0, failed when its tries are used up.
rem When no step is pending the runner deletes its task and RunOnce hook and writes
rem firstboot.done. Log: firstboot.log; one line per step: firstboot.status.
setlocal EnableExtensions
set "H2K=@STAGING@"
set "LOG=%H2K%\firstboot.log"
set "STATE=%H2K%\state"
set "SYS=%SystemRoot%\System32"
set "PS=%SYS%\WindowsPowerShell\v1.0\powershell.exe"
if not exist "%STATE%" mkdir "%STATE%"
call :log runner started
set WATCHDOG=0
if exist "%PS%" set WATCHDOG=1
if "%WATCHDOG%"=="0" call :log PowerShell missing: steps run without the per-step watchdog, bounded by the task time limit @TASK_LIMIT@
for /f "usebackq eol=# tokens=1,2" %%A in ("%H2K%\steps.txt") do call :step %%A %%B
call :finish
endlocal
exit /b 0

:step
set "NAME=%~1"
set "LIMIT=%~2"
if exist "%STATE%\%NAME%.done" exit /b 0
if exist "%STATE%\%NAME%.failed" exit /b 0
:step_try
set TRIES=0
if exist "%STATE%\%NAME%.tries" set /p TRIES=<"%STATE%\%NAME%.tries"
if %TRIES% GEQ @MAX_TRIES@ goto step_failed
set /a TRIES+=1
>"%STATE%\%NAME%.tries" echo %TRIES%
call :log %NAME%: try %TRIES% of @MAX_TRIES@, limit %LIMIT% s
if "%WATCHDOG%"=="1" goto step_watchdog
cmd /c ""%H2K%\steps\%NAME%.cmd" >>"%LOG%" 2>&1"
goto step_result
:step_watchdog
"%PS%" -NoProfile -NonInteractive -ExecutionPolicy Bypass -File "%H2K%\h2k-watchdog.ps1" -Seconds %LIMIT% -Script "%H2K%\steps\%NAME%.cmd" -Log "%LOG%"
:step_result
set RC=%ERRORLEVEL%
if "%RC%"=="0" goto step_done
call :log %NAME%: exit code %RC%
if %TRIES% GEQ @MAX_TRIES@ goto step_failed
call :log %NAME%: next try in @PAUSE@ s
"%SYS%\ping.exe" -n @PAUSE_PINGS@ 127.0.0.1 >nul
goto step_try
:step_done
>"%STATE%\%NAME%.done" echo %TRIES%
call :log %NAME%: done
exit /b 0
:step_failed
>"%STATE%\%NAME%.failed" echo %TRIES%
call :log %NAME%: FAILED after %TRIES% tries, not marked done
exit /b 0

:finish
set LEFT=0
set FAILED=0
>"%H2K%\firstboot.status" echo # step state tries
for /f "usebackq eol=# tokens=1" %%A in ("%H2K%\steps.txt") do call :status %%A
if "%LEFT%"=="1" goto finish_later
"%SYS%\schtasks.exe" /delete /tn @TASK@ /f >>"%LOG%" 2>&1
"%SYS%\reg.exe" delete "HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\RunOnce" /v @RUNONCE@ /f >nul 2>&1
>"%H2K%\firstboot.done" echo failures %FAILED%
call :log first boot finished, failures %FAILED%; task @TASK@ and RunOnce hook removed
exit /b 0
:finish_later
call :log steps are pending: the task runs again at the next boot
exit /b 0

:status
set "S=pending"
set "T=0"
if exist "%STATE%\%~1.tries" set /p T=<"%STATE%\%~1.tries"
if exist "%STATE%\%~1.done" set "S=done"
if exist "%STATE%\%~1.failed" set "S=failed"
if "%S%"=="failed" set FAILED=1
if "%S%"=="pending" set LEFT=1
>>"%H2K%\firstboot.status" echo %~1 %S% %T%
exit /b 0

:log
>>"%LOG%" echo %DATE% %TIME% %*
exit /b 0
